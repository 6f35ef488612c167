"""The engine loop: one background thread owns the (single-threaded) engine; the HTTP side talks to it
through a thread-safe inbox and per-request asyncio queues.

Key choices:
- Only the loop thread ever touches the engine. Requests are added and aborted by commands put in the
  inbox, which the loop drains between two `step()`s; outputs go back to the event loop of the
  request's handler with `loop.call_soon_threadsafe`, so no lock is held while the model runs.
- `add` answers through a future: the engine's own check ("this request cannot fit") becomes an
  HTTP 400 before any byte of a stream is sent.
- A failing `step()` (a bug, not bad input) fails the requests in flight and aborts them; the thread
  keeps serving later requests.
- The loop blocks on the inbox when the engine is idle, so an idle server uses no CPU.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable


class EngineDied(RuntimeError):
    """`step()` raised; the request it was serving cannot complete."""


@dataclass
class _Sink:
    """Where a request's outputs go: a queue that belongs to the event loop of its handler."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the event loop is closed: the server is shutting down
        pass


def _deliver(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class EngineRunner:
    """Runs `engine.step()` in a daemon thread while there is work.

    Args:
        engine: an object with add_request(request_id, prompt_token_ids, params), abort_request(id),
            step() -> list of outputs with .request_id and .finished, and has_unfinished_requests().
    """

    def __init__(self, engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sinks: dict[str, _Sink] = {}
        self._thread = threading.Thread(target=self._loop, name="nanoseek-engine", daemon=True)
        self._stopped = False

    def start(self) -> "EngineRunner":
        if not self._thread.is_alive():
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stopped = True
        self._inbox.put(("stop",))
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def num_active(self) -> int:
        """Requests whose outputs someone is still waiting for (a racy read, for health checks and tests)."""
        return len(self._sinks)

    # ---- called from the event loop -----------------------------------------------------------------

    async def add(self, request_id: str, prompt_token_ids: list[int], params,
                  q: asyncio.Queue | None = None) -> asyncio.Queue:
        """Queue a request; returns the asyncio.Queue (`q` if given) that receives its outputs.

        The queue receives every output of the request (the last one has .finished set), or an
        EngineDied exception. Raises whatever `engine.add_request` raised (ValueError for a request
        that cannot fit).
        """
        if self._stopped:
            raise EngineDied("the engine has been stopped")
        q = asyncio.Queue() if q is None else q
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("add", request_id, prompt_token_ids, params, _Sink(asyncio.get_running_loop(), q), done))
        await asyncio.wrap_future(done)
        return q

    def abort(self, request_id: str) -> None:
        """Stop generating for `request_id` and free its slot (a no-op for finished requests)."""
        self._inbox.put(("abort", request_id))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn()` on the engine thread between two steps (for one-off work that uses the model)."""
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", fn, done))
        return await asyncio.wrap_future(done)

    # ---- the engine thread --------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            try:  # block on the inbox only while the engine is idle
                cmd = self._inbox.get_nowait() if self.engine.has_unfinished_requests() else self._inbox.get()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd[0] == "stop":
                    self._fail_all(EngineDied("the server is shutting down"))
                    return
                self._handle(cmd)
                try:
                    cmd = self._inbox.get_nowait()
                except queue.Empty:
                    cmd = None
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001 - keep serving; the requests in flight get the error
                self._fail_all(EngineDied(f"engine step failed: {type(e).__name__}: {e}"))
                continue
            batches: dict[asyncio.AbstractEventLoop, list] = {}
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is None:
                    continue
                batches.setdefault(sink.loop, []).append((sink.queue, out))
                if out.finished:
                    del self._sinks[out.request_id]
            for loop, items in batches.items():  # one wake-up of each event loop per step, not per request
                _call_soon(loop, _deliver, items)

    def _handle(self, cmd: tuple) -> None:
        kind = cmd[0]
        if kind == "add":
            _, rid, ids, params, sink, done = cmd
            if not done.set_running_or_notify_cancel():
                return
            try:
                self.engine.add_request(rid, ids, params)
            except Exception as e:  # noqa: BLE001 - handed to the caller, who maps it to an HTTP error
                done.set_exception(e)
            else:
                self._sinks[rid] = sink
                done.set_result(None)
        elif kind == "abort":
            if self._sinks.pop(cmd[1], None) is not None:
                self.engine.abort_request(cmd[1])
        elif kind == "call":
            _, fn, done = cmd
            if not done.set_running_or_notify_cancel():
                return
            try:
                done.set_result(fn())
            except Exception as e:  # noqa: BLE001
                done.set_exception(e)

    def _fail_all(self, error: Exception) -> None:
        for rid, sink in list(self._sinks.items()):
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - the engine is already broken; freeing is best effort
                pass
            _call_soon(sink.loop, sink.queue.put_nowait, error)
        self._sinks.clear()
