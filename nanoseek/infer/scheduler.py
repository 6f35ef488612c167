"""Continuous batching over a fixed pool of cache slots.

Requests wait in arrival order (FCFS: the head of the queue is never overtaken) and are admitted
between steps when enough slots are free for all their n samples and the padded prefill batch stays
within `max_prefill_tokens` (the first request is always admitted, so a long prompt cannot starve).
A slot is one row of the LatentCache; it is returned as soon as its sequence finishes or is aborted.
"""

from __future__ import annotations

from collections import deque

from .sequence import Request, Sequence


class Scheduler:
    def __init__(self, num_slots: int, max_prefill_tokens: int):
        self.num_slots = num_slots
        self.max_prefill_tokens = max_prefill_tokens
        self._free = list(range(num_slots - 1, -1, -1))   # pop() hands out the lowest slot first
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.running or any(r.request_id == request_id for r in self.waiting)

    def admit(self) -> list[Request]:
        """Move waiting requests into free slots; returns the newly admitted ones (to prefill)."""
        admitted: list[Request] = []
        longest = 0
        while self.waiting:
            req = self.waiting[0]
            need = len(req.seqs)
            longest_if = max(longest, len(req.prompt_ids))
            if need > len(self._free) or (admitted and (len(admitted) + 1) * longest_if > self.max_prefill_tokens):
                break
            self.waiting.popleft()
            for seq in req.seqs:
                seq.slot = self._free.pop()
            self.running[req.request_id] = req
            admitted.append(req)
            longest = longest_if
        return admitted

    def running_seqs(self) -> list[Sequence]:
        return [s for r in self.running.values() for s in r.seqs if not s.finished]

    def release(self, seq: Sequence) -> None:
        """Give back a sequence's slot (finished or aborted)."""
        if seq.slot is not None:
            self._free.append(seq.slot)
            seq.slot = None

    def finish(self, request: Request) -> None:
        for seq in request.seqs:
            self.release(seq)
        self.running.pop(request.request_id, None)

    def abort(self, request_id: str) -> bool:
        """Drop a request wherever it is; its slots are free on return. False if unknown."""
        if request_id in self.running:
            self.finish(self.running[request_id])
            return True
        for req in self.waiting:
            if req.request_id == request_id:
                self.waiting.remove(req)
                return True
        return False
