"""POST /api/search (an uploaded photo) and GET /api/similar/{id} (a gallery photo's vector)."""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, File, Form, HTTPException, Query, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from siamese_cv.retrieval.engine import Hit as EngineHit
from siamese_cv.serve.routes._deps import check_label, check_top, current_engine, unknown_id
from siamese_cv.serve.schemas import Error, Hit, QuerySize, SearchResponse
from siamese_cv.serve.uploads import Refused, prepare_upload, too_large

router = APIRouter(prefix="/api", tags=["search"])

_ERRORS = {400: {"model": Error}, 413: {"model": Error}, 422: {"model": Error}}
_ERRORS |= {503: {"model": Error, "description": "the outputs on disk cannot be served"}}


def hits_out(hits: list[EngineHit]) -> list[Hit]:
    return [
        Hit(
            rank=h.rank,
            id=h.id,
            label_name=h.label_name,
            score=h.score,
            copy=h.copy,
            copy_score=h.copy_score,
            image_url=f"/api/images/{quote(h.id, safe='')}",
        )
        for h in hits
    ]


@router.post("/search", response_model=SearchResponse, responses=_ERRORS)
async def search(
    request: Request,
    image: Annotated[UploadFile, File(description="the photo: JPEG, PNG, WebP, GIF, BMP, TIFF")],
    top: Annotated[int, Form(description="how many results, 1 to the server's limit (100)")] = 20,
    label: Annotated[str | None, Form(description="only photos of this class")] = None,
) -> SearchResponse:
    """The gallery photos most similar to an uploaded photo, best first; its copies lead."""
    started = time.perf_counter()
    settings = request.app.state.settings
    top = check_top(top, request)
    engine = current_engine(request)
    label = check_label(label, engine)
    batcher = request.app.state.batcher
    with batcher.coming():  # a batch forming now waits for this query
        data = await image.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, too_large(len(data), settings).detail)
        try:
            prepared, (width, height) = await run_in_threadpool(
                prepare_upload, data, engine, settings
            )
        except Refused as refused:
            raise HTTPException(refused.status, refused.detail) from None
    query = await batcher.embed(engine, prepared)
    hits = await run_in_threadpool(engine.search_query, query, top, label)
    return SearchResponse(
        query=QuerySize(width=width, height=height, bytes=len(data)),
        top=top,
        label=label,
        took_ms=round(1000 * (time.perf_counter() - started), 2),
        copy_rule=engine.copy_rule(),
        hits=hits_out(hits),
    )


@router.get("/similar/{photo_id:path}", response_model=SearchResponse, responses=_ERRORS)
async def similar(
    request: Request,
    photo_id: str,
    top: Annotated[int, Query(description="how many results, 1 to the server's limit (100)")] = 20,
    label: Annotated[str | None, Query(description="only photos of this class")] = None,
) -> SearchResponse:
    """The gallery photos most similar to gallery photo `photo_id`, by its stored vector."""
    started = time.perf_counter()
    top = check_top(top, request)
    engine = current_engine(request)
    label = check_label(label, engine)
    if not engine.has(photo_id):
        raise unknown_id(photo_id)
    hits = await run_in_threadpool(engine.similar, photo_id, top, label)
    return SearchResponse(
        query_id=photo_id,
        top=top,
        label=label,
        took_ms=round(1000 * (time.perf_counter() - started), 2),
        copy_rule=engine.copy_rule(),
        hits=hits_out(hits),
    )
