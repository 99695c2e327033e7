"""GET /api/health and GET /api/info: is it serving, and what."""

from __future__ import annotations

from fastapi import APIRouter, Request

from siamese_cv.serve.routes._deps import current_engine
from siamese_cv.serve.schemas import Error, Health, Info

router = APIRouter(prefix="/api", tags=["server"])


@router.get("/health", response_model=Health, responses={503: {"model": Error}})
async def health(request: Request) -> Health:
    """200 while a model, gallery and index that belong together are served; else 503."""
    engine = current_engine(request)
    return Health(status="ok", gallery_size=len(engine.ids), loaded_at=engine.loaded_at)


@router.get("/info", response_model=Info, responses={503: {"model": Error}})
async def info(request: Request) -> Info:
    """The served model, embedder, gallery and index."""
    engine = current_engine(request)
    return Info(**engine.info(), loaded_at=engine.loaded_at)
