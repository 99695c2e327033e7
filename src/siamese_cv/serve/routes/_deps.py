"""What every route takes from the app: the settings, the current engine, the batcher."""

from __future__ import annotations

from fastapi import HTTPException, Request

from siamese_cv.retrieval.engine import SearchEngine
from siamese_cv.serve.state import Unavailable


def current_engine(request: Request) -> SearchEngine:
    """The engine this request is answered with, start to end (a swap does not change it)."""
    try:
        return request.app.state.holder.current()
    except Unavailable as error:
        raise HTTPException(503, str(error)) from None


def check_top(top: int, request: Request) -> int:
    most = request.app.state.settings.max_top
    if not 1 <= top <= most:
        raise HTTPException(422, f"top: {top} is out of range; ask for 1 to {most} results")
    return top


def check_label(label: str | None, engine: SearchEngine) -> str | None:
    if label in (None, ""):
        return None
    if label not in engine.classes:
        raise HTTPException(
            422, f"label: {label!r} is not a class of this gallery; /api/info lists them"
        )
    return label


def unknown_id(photo_id: str) -> HTTPException:
    return HTTPException(404, f"no gallery photo has id {photo_id!r}; ids come from search results")
