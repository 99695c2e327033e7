"""GET /api/images/{id}: a gallery photo's stored bytes, looked up by id, never by path."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from siamese_cv.serve.routes._deps import current_engine, unknown_id
from siamese_cv.serve.schemas import Error

router = APIRouter(prefix="/api", tags=["images"])

_TYPES = {b"\xff\xd8\xff": "image/jpeg", b"\x89PNG": "image/png", b"RIFF": "image/webp"}


@router.get(
    "/images/{photo_id:path}",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}}},
        404: {"model": Error},
        503: {"model": Error},
    },
)
async def image(request: Request, photo_id: str) -> Response:
    """The photo as data/processed stores it: what the gallery embedded."""
    engine = current_engine(request)
    if not engine.has(photo_id):
        raise unknown_id(photo_id)
    data = await run_in_threadpool(engine.image_bytes, photo_id)
    media = next((t for magic, t in _TYPES.items() if data.startswith(magic)), None)
    return Response(
        data,
        media_type=media or "application/octet-stream",
        headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"},
    )
