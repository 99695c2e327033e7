"""The served outputs: one `SearchEngine`, replaced whole when the pipeline replaces its files.

A watcher polls `outputs_fingerprint` (file identities, cheap). When `dvc repro` or `dvc
checkout` has replaced the model, gallery or index, it loads the new ones in a thread beside the
old engine, which keeps answering, then swaps the reference in one assignment. A request takes
the reference once, so it finishes on the engine it started with. Outputs that do not load (a
model and gallery that do not belong together, an index of another gallery) are never served:
every query gets a 503 naming the stage to rerun until the files change again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor

from siamese_cv.core.errors import UserError
from siamese_cv.retrieval.engine import SearchEngine, outputs_fingerprint
from siamese_cv.serve.settings import Settings

logger = logging.getLogger(__name__)


class Unavailable(Exception):
    """Nothing can be served right now; the message says why and what to run."""


class EngineHolder:
    """The current engine, or why there is none."""

    def __init__(
        self,
        settings: Settings,
        loader: Callable[..., SearchEngine] | None = None,
        on_load: Callable[[SearchEngine, bool], None] | None = None,
    ):
        """`on_load(engine, swapped)` is called after each successful load (metrics)."""
        self.settings = settings
        self._on_load = on_load
        self._loader = loader or SearchEngine.load
        self._engine: SearchEngine | None = None
        self._error = "the outputs are still loading; retry in a few seconds"
        self._tried: tuple | None = None  # the fingerprint of the last load, good or bad
        self.swaps = 0

    def current(self) -> SearchEngine:
        """The engine to answer one request with.

        Raises:
            Unavailable: the outputs on disk cannot be served (or are not loaded yet).
        """
        engine = self._engine
        if engine is None:
            raise Unavailable(self._error)
        return engine

    def set(self, engine: SearchEngine) -> None:
        self._engine, self._tried = engine, engine.fingerprint
        if self._on_load is not None:
            self._on_load(engine, False)

    def fingerprint(self) -> tuple:
        return outputs_fingerprint(self.settings.project_dir)

    def reload(self) -> bool:
        """Load the outputs if they changed since the last try; returns whether it swapped."""
        now = self.fingerprint()
        if now == self._tried:
            return False
        self._tried = now
        try:
            engine = self._loader(self.settings.project_dir, threads=self.settings.threads)
        except UserError as error:
            self._engine, self._error = None, f"cannot serve these outputs: {error}"
            logger.error("%s", self._error)
            return False
        except Exception as error:  # a file replaced while being read, or damaged
            logger.exception("loading the outputs failed")
            first = " ".join(str(error).split())[:160]
            self._engine = None
            self._error = f"cannot load the outputs ({first}); run `dvc repro` or `dvc checkout`"
            return False
        first_load = self._engine is None and self.swaps == 0
        self._engine, self._error = engine, ""
        if not first_load:
            self.swaps += 1
            logger.info("swapped in the new outputs: %s", engine.index.describe())
        if self._on_load is not None:
            self._on_load(engine, not first_load)
        return True

    async def watch(self, executor: Executor) -> None:
        """Reload when the outputs change, every `reload_interval_s`, until cancelled."""
        loop = asyncio.get_running_loop()
        interval = self.settings.reload_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await loop.run_in_executor(executor, self.reload)
            except Exception:  # the watcher must outlive any one failure
                logger.exception("checking the outputs for changes failed")
