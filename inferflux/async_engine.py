"""The asyncio front of the engine: the engine loop runs on its own thread, never on the event
loop; each request gets an asyncio queue of DELTA RequestOutputs.

Commands (add, abort) cross into the engine thread through a thread-safe inbox and are applied
between steps, so an abort frees the request's pages before the next step is scheduled.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from inferflux.config import EngineConfig
from inferflux.engine import LLMEngine, PreparedRequest
from inferflux.outputs import RequestOutput
from inferflux.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an internal error; no request can make progress."""


@dataclass
class _Add:
    prep: PreparedRequest
    stream: asyncio.Queue[RequestOutput | BaseException]
    loop: asyncio.AbstractEventLoop


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.Queue[Any], asyncio.AbstractEventLoop]] = {}
        self._thread: threading.Thread | None = None
        self._dead: BaseException | None = None
        self._stopping = False

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        """Loads and compiles the model (blocking: minutes for big models)."""
        return cls(LLMEngine(config))

    # ---- public API (event loop side) -----------------------------------------------------
    async def generate(
        self,
        prompt: str | list[int],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[RequestOutput]:
        """Yields DELTA outputs until the request finishes. Leaving the loop early (or the task
        being cancelled, e.g. on client disconnect) aborts the request and frees its pages."""
        if self._dead is not None:
            raise EngineDeadError("the engine stopped") from self._dead
        # NOTE: tokenizing a long prompt takes milliseconds; keep it off the event loop.
        prep = await asyncio.to_thread(
            self.engine.prepare_request, request_id, prompt, sampling_params, **kwargs
        )
        stream: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._ensure_started()
        self._inbox.put(_Add(prep, stream, asyncio.get_running_loop()))
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._inbox.put(_Abort(prep.request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stops the engine thread; unfinished requests are aborted."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- engine thread --------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inferflux-engine", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopping:
                idle = not self.engine.has_unfinished_requests()
                if not self._drain_inbox(block=idle):
                    break
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        self._deliver(out.request_id, out, done=out.finished)
        except BaseException as exc:  # noqa: BLE001 - every waiter must hear about it
            logger.exception("engine loop failed")
            self._dead = exc
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine failed: {exc!r}"), done=True)
        finally:
            for rid in list(self._streams):
                self.engine.abort_request(rid)
                self._deliver(rid, EngineDeadError("engine shut down"), done=True)

    def _drain_inbox(self, block: bool) -> bool:
        """Applies queued commands; returns False when asked to stop."""
        while True:
            try:
                cmd = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if cmd is None:
                return False
            if isinstance(cmd, _Abort):
                self.engine.abort_request(cmd.request_id)
                self._streams.pop(cmd.request_id, None)
                continue
            try:
                self.engine.submit(cmd.prep)
            except ValueError as exc:  # e.g. a duplicate request id
                cmd.loop.call_soon_threadsafe(cmd.stream.put_nowait, exc)
                continue
            self._streams[cmd.prep.request_id] = (cmd.stream, cmd.loop)

    def _deliver(self, request_id: str, item: RequestOutput | BaseException, done: bool) -> None:
        entry = self._streams.pop(request_id, None) if done else self._streams.get(request_id)
        if entry is None:
            return
        stream, loop = entry
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.engine.abort_request(request_id)
