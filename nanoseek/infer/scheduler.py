"""Continuous batching over a fixed pool of cache slots.

Requests wait in arrival order (FCFS: the head of the queue is never overtaken) and are admitted
between steps when enough slots are free for all their n samples and the padded prefill batch stays
within `max_prefill_tokens` (the first request is always admitted, so a long prompt cannot starve).
A slot is one row of the LatentCache; it is returned as soon as its sequence finishes or is aborted.
`compact` keeps the running sequences in the lowest slots, so a decode step reads the cache rows
0..B-1 as a view instead of gathering a copy of every row's history at every layer.
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
        """The unfinished sequences, in slot order."""
        return sorted((s for r in self.running.values() for s in r.seqs if not s.finished), key=lambda s: s.slot)

    def compact(self) -> list[tuple[Sequence, int]]:
        """Move every running sequence that sits at or above slot B (B = running sequences) into a free
        slot below B; returns the moves (sequence, its old slot) for the caller to copy the cache rows.
        Each finished sequence causes at most one move, so the copies cost far less than gathering."""
        seqs = self.running_seqs()
        B = len(seqs)
        holes = sorted(slot for slot in self._free if slot < B)
        moves = []
        for seq, hole in zip([s for s in seqs if s.slot >= B], holes):
            moves.append((seq, seq.slot))
            seq.slot = hole
        if moves:
            used = set(holes[:len(moves)])
            self._free = sorted(set(self._free) - used | {old for _, old in moves}, reverse=True)
        return moves

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
