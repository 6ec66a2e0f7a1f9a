"""One generation run on a worker thread and read from another: its text pieces as they come, then its result.

web reads the pieces on Gradio's thread (`for`), serve on the event loop (`async for`). The reader
stops the generation when it goes away (a closed page, a client that disconnected): the engine's
next text piece then raises `Cancelled` inside the generation, which ends it early, and one that
has not started yet never starts. An error of the generation is kept in `result` for the reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import threading
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, Generic, Iterator, Literal, TypeVar

T = TypeVar("T")
TextCallback = Callable[[str], None]

_END = object()  # after the last piece: the result is set


class Cancelled(Exception):
    """Raised inside a generation, from its text callback, once its reader has gone away."""


class Generation(Generic[T]):
    """`generate(on_text)` run by `run` on a worker thread; its pieces read with `for` or `async for`.

    read_by: who reads the text pieces: another thread, the event loop this is made on, or nobody
    (then `generate` gets no text callback, so the engine need not decode as it goes, and only
    `result` is read). Leaving a `with` block around the reading stops the generation.
    """

    def __init__(self, generate: Callable[[TextCallback | None], T],
                 read_by: Literal["thread", "event_loop"] | None = "thread") -> None:
        self.result: Future[T] = Future()
        self._generate = generate
        self._streams = read_by is not None
        self._stopped = threading.Event()
        self._pieces: queue.Queue[Any] | asyncio.Queue[Any]
        self._put: Callable[[Any], Any]
        if read_by == "event_loop":
            self._pieces = asyncio.Queue()
            self._put = functools.partial(asyncio.get_running_loop().call_soon_threadsafe, self._pieces.put_nowait)
        else:
            self._pieces = queue.Queue()
            self._put = self._pieces.put
        self.result.add_done_callback(self._end)

    def run(self) -> None:
        """Generate on the calling thread; the result, or the error, goes to `result`."""
        if self._stopped.is_set():
            self.result.cancel()
        if not self.result.set_running_or_notify_cancel():
            return
        try:
            self.result.set_result(self._generate(self._on_text if self._streams else None))
        except BaseException as err:  # the reader's to report; the thread that runs generations lives on
            self.result.set_exception(err)

    def stop(self) -> None:
        """The reader is gone: end the generation at its next piece, or skip it if it has not started."""
        self._stopped.set()

    def __enter__(self) -> Generation[T]:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()  # a no-op when the generation is over

    def __iter__(self) -> Iterator[str]:
        while (piece := self._pieces.get()) is not _END:
            yield piece

    async def __aiter__(self) -> AsyncIterator[str]:
        while (piece := await self._pieces.get()) is not _END:
            yield piece

    def _on_text(self, piece: str) -> None:
        if self._stopped.is_set():
            raise Cancelled()
        self._put(piece)

    def _end(self, _result: Future[T]) -> None:
        with contextlib.suppress(RuntimeError):  # the reading event loop is closed: nobody is left to tell
            self._put(_END)
