"""How many requests `fundusfm serve` holds in memory at once (`Gate`).

A request takes a turn before its body is read: at most `max_concurrent` requests read
their body and are scored at once, in a pool of as many threads; up to `max_waiting` more
wait for a turn with their bodies unread (uvicorn stops reading a connection whose request
is not consumed, so a waiting upload holds a few kilobytes, not its file); past that the
answer is 503 (busy) before any byte of the body is read. Memory is thus bounded by
`max_concurrent` x (`max_upload_bytes` + one decoded image of at most `max_pixels`).

The turns are handed over with futures of each waiter's own event loop, under a thread
lock, so one gate serves any number of event loops (uvicorn's one, or a test client's
loop per request).
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fundusfm.serve.upload import UploadRefused


class _Turn:
    """One request's place: granted now, or a future its loop awaits until it is."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.future = self.loop.create_future()
        self.granted = False

    def grant(self) -> None:
        """Hand the turn over (from any thread); a waiter gone meanwhile is passed over."""
        self.granted = True
        self.loop.call_soon_threadsafe(_resolve, self.future)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class Gate:
    """At most `concurrent` requests read and scored at once; `waiting` more may queue."""

    def __init__(self, concurrent: int, waiting: int):
        self.concurrent, self.room = concurrent, concurrent + waiting
        self.inside = self.active = 0  # requests holding or awaiting a turn; holding one
        self.queue: deque[_Turn] = deque()
        self.lock, self.pool = threading.Lock(), None

    @asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Hold a turn for the block (503 `busy` when the queue is full, before waiting)."""
        mine = self._enter()
        try:
            await mine.future
            yield
        finally:
            self._leave(mine)

    def _enter(self) -> _Turn:
        with self.lock:
            if self.inside >= self.room:
                busy = f"the server is busy: {self.inside} uploads are being scored or wait"
                raise UploadRefused(503, "busy", busy + " (setting max_waiting); retry soon")
            self.inside += 1
            mine = _Turn()
            if self.active < self.concurrent:
                self.active += 1
                mine.grant()
            else:
                self.queue.append(mine)
            return mine

    def _leave(self, mine: _Turn) -> None:
        with self.lock:
            self.inside -= 1
            if not mine.granted:  # cancelled while waiting (the client went away)
                self.queue.remove(mine)
            elif self.queue:
                self.queue.popleft().grant()
            else:
                self.active -= 1

    async def score(self, fn, *args):
        """`fn(*args)` in the gate's threads (call it while holding a turn)."""
        with self.lock:
            if self.pool is None:  # first upload, or the first since the server stopped
                self.pool = ThreadPoolExecutor(self.concurrent, "fundusfm-serve")
            pool = self.pool
        return await asyncio.wrap_future(pool.submit(fn, *args))

    async def run(self, fn, *args):
        """`fn(*args)` in the gate's threads, in its turn."""
        async with self.turn():
            return await self.score(fn, *args)

    def close(self) -> None:
        """Stop the threads (when the server stops); a later upload starts new ones."""
        with self.lock:
            pool, self.pool = self.pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
