"""Micro-batching: queries that arrive together are embedded in one forward pass.

The first query of a batch waits at most `wait_s` for others, up to `max_batch`, and only while
another request is on its way (announced with `coming()` before its upload is decoded): a lone
query never waits for company that is not coming. Embedding runs
in one worker thread, off the event loop, so queries that arrive meanwhile form the next batch.
Each batch is embedded by the engine its queries were given (a swap mid-batch splits it).
Both networks (the trained one, and the copy descriptor when the gallery has data/copies) see
the batch. Vectors are those of one-at-a-time embedding: the network sees each image independently
(eval mode, no batch statistics); only float rounding in batched matrix products may differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import Executor

from PIL import Image

from siamese_cv.retrieval.engine import Query, SearchEngine

logger = logging.getLogger(__name__)


class MicroBatcher:
    """Embeds prepared query images in batches; `embed` is awaited by each request.

    Args:
        executor: where embedding runs (one worker keeps batches in order and the cores busy).
        wait_s: the longest the first query of a batch waits for more.
        max_batch: the most images per forward pass (1: no batching).
        on_batch: called with each batch's size (metrics).
    """

    def __init__(
        self,
        executor: Executor,
        wait_s: float = 0.005,
        max_batch: int = 16,
        on_batch: Callable[[int], None] | None = None,
    ):
        self._executor = executor
        self._wait_s = wait_s
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._coming = 0

    @contextlib.contextmanager
    def coming(self):
        """Mark a query as on its way (decoding) while the body runs, so a batch waits for it."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def embed(self, engine: SearchEngine, image: Image.Image) -> Query:
        """One prepared image (`engine.prepare`) embedded for search (`engine.embed_queries`)."""
        assert self._queue is not None, "start() the batcher in the app's lifespan"
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((engine, image, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self._wait_s
            while len(batch) < self._max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0 or self._coming == 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except TimeoutError:
                    break
            await self._embed(loop, batch)

    async def _embed(self, loop: asyncio.AbstractEventLoop, batch: list) -> None:
        groups: dict[int, list] = {}
        for item in batch:
            groups.setdefault(id(item[0]), []).append(item)
        for items in groups.values():
            live = [item for item in items if not item[2].done()]  # a client that left
            if not live:
                continue
            engine = live[0][0]
            if self._on_batch is not None:
                self._on_batch(len(live))
            try:
                queries = await loop.run_in_executor(
                    self._executor, engine.embed_queries, [item[1] for item in live]
                )
            except Exception as error:
                for _, _, future in live:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (_, _, future), query in zip(live, queries, strict=True):
                if not future.done():
                    future.set_result(query)
