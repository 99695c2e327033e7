"""The API's response bodies: pydantic models, so /docs documents every field."""

from __future__ import annotations

from pydantic import BaseModel, Field


class Hit(BaseModel):
    rank: int = Field(description="1 for the most similar photo")
    id: str = Field(description="the gallery photo's id (as in data/gallery)")
    label_name: str = Field(description="the photo's class")
    score: float = Field(description="cosine similarity to the query, -1 to 1")
    is_copy: bool = Field(  # named `copy` in JSON; the attribute would shadow BaseModel.copy
        False,
        alias="copy",
        description="the copy rule calls this photo a copy of the query (see copy_rule)",
    )
    copy_score: float | None = Field(
        None, description="for a copy: the copy descriptor's cosine similarity to the query"
    )
    image_url: str = Field(description="where the photo's bytes are: /api/images/{id}")


class QuerySize(BaseModel):
    width: int
    height: int
    bytes: int


class SearchResponse(BaseModel):
    query: QuerySize | None = Field(None, description="the uploaded photo (None for /similar)")
    query_id: str | None = Field(None, description="the gallery photo searched by (/similar)")
    top: int
    label: str | None = Field(None, description="the class the hits were limited to")
    took_ms: float = Field(description="time in the server, decoding and embedding included")
    copy_rule: str | None = Field(
        None, description="what makes a hit a copy; None when the server marks no copies"
    )
    hits: list[Hit] = Field(description="copies of the query first, then the most similar")


class Info(BaseModel):
    model_fingerprint: str | None
    backbone: str | None
    embedding_dim: int
    gallery_size: int
    index_kind: str = Field(description="exact or ivf")
    classes: list[str]
    engine: str = Field(description="what embeds a query: torch or onnxruntime")
    precision: str
    image_size: int
    input_sizes: list[int]
    splits: list[str]
    copy_rule: str | None = Field(None, description="what marks a hit a copy (None: nothing)")
    loaded_at: float = Field(description="when these outputs were loaded (Unix time)")


class Health(BaseModel):
    status: str
    gallery_size: int
    loaded_at: float


class Error(BaseModel):
    detail: str = Field(description="one line: what was wrong")
