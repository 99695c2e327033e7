"""The app factory: `create_app(settings)` is what `siamese-serve` runs and the tests call.

State (the engine holder, the batcher, the worker thread, the metrics) is made in the lifespan
and hangs on `app.state`; requests never mutate it. Every error reaches a client as JSON with a
one-line `detail`; a bug's traceback stays in the server's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from siamese_cv.retrieval.engine import SearchEngine
from siamese_cv.serve.batcher import MicroBatcher
from siamese_cv.serve.limits import BodyLimitMiddleware
from siamese_cv.serve.metrics import Metrics, MetricsMiddleware
from siamese_cv.serve.routes import images, search, server
from siamese_cv.serve.settings import Settings
from siamese_cv.serve.state import EngineHolder
from siamese_cv.serve.uploads import too_large

logger = logging.getLogger(__name__)

STATIC = Path(str(files("siamese_cv.serve") / "static"))


def create_app(settings: Settings | None = None, engine: SearchEngine | None = None) -> FastAPI:
    """The reverse image search app for `settings.project_dir`.

    Args:
        settings: limits and behaviour (defaults: `Settings()`).
        engine: already loaded outputs (the command loads them first, so a project that
            cannot be served fails before the port opens); None: loaded in the lifespan.
    """
    settings = settings or Settings()
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        def loaded(new: SearchEngine, swapped: bool) -> None:
            metrics.gallery_size.set(len(new.ids))
            if swapped:
                metrics.swaps.inc()

        holder = EngineHolder(settings, on_load=loaded)
        # one thread embeds (batches stay in order, torch keeps its intra-op threads);
        # another loads and watches the outputs, so a reload never waits behind queries
        embed_pool = ThreadPoolExecutor(1, thread_name_prefix="embed")
        watch_pool = ThreadPoolExecutor(1, thread_name_prefix="reload")
        loop = asyncio.get_running_loop()
        if engine is not None:
            holder.set(engine)
        else:
            await loop.run_in_executor(watch_pool, holder.reload)
        batcher = MicroBatcher(
            embed_pool,
            wait_s=settings.batch_wait_ms / 1000 if settings.batching else 0.0,
            max_batch=settings.max_batch if settings.batching else 1,
            on_batch=metrics.batch_size.observe,
        )
        batcher.start()
        app.state.settings, app.state.holder, app.state.batcher = settings, holder, batcher
        app.state.metrics = metrics
        watcher = None
        if settings.reload_interval_s > 0:
            watcher = loop.create_task(holder.watch(watch_pool))
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            await batcher.stop()
            embed_pool.shutdown(wait=False, cancel_futures=True)
            watch_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="siamese-cv reverse image search",
        summary="Upload a photo, get the most similar photos of the gallery with their scores.",
        version="1",
        lifespan=lifespan,
    )
    app.include_router(search.router)
    app.include_router(images.router)
    app.include_router(server.router)
    _errors_as_json(app)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.max_upload_bytes,
        detail=too_large(None, settings).detail,
    )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _errors_as_json(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = error.detail if isinstance(error.detail, str) else str(error.detail)
        if error.status_code == 404 and detail == "Not Found":
            detail = f"{request.url.path}: no such page; the API is under /api (see /docs)"
        if error.status_code == 405:
            detail = f"{request.method} {request.url.path}: method not allowed (see /docs)"
        return JSONResponse({"detail": _one_line(detail)}, error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        message = first.get("msg", "invalid request")
        if first.get("type") == "missing":
            message = "missing; send it as a multipart form field"
            if where == "image":
                message = "missing; send the photo as the multipart form field 'image'"
        return JSONResponse({"detail": _one_line(f"{where}: {message}")}, 422)

    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception) -> JSONResponse:
        logger.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": "internal error; the server's log has the details"}, 500)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


__all__ = ["create_app"]
