"""What a server is allowed to do: every limit is a setting with a safe default."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class Settings(BaseModel):
    """The server's settings; `siamese-serve --help` sets each one.

    Attributes:
        project_dir: the pipeline project whose models/, data/gallery, data/index and
            data/processed are served.
        max_upload_mb: uploads over this are refused (413) before they are decoded.
        max_pixels: images with more pixels are refused (413) before they are decoded: a
            decompression bomb is a small file of a huge image.
        max_top: the most results one query may ask for.
        cors_origins: origins allowed to call the API from a browser; none: CORS stays off.
        batching: embed queries that arrive together in one batch.
        batch_wait_ms: how long the first query of a batch waits for others.
        max_batch: the most queries in one batch.
        reload_interval_s: how often the outputs on disk are checked for a new version;
            0 turns live reloading off.
        threads: CPU threads for the network (None: torch's default).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    project_dir: Path = Path(".")
    max_upload_mb: float = Field(20.0, gt=0)
    max_pixels: int = Field(40_000_000, gt=0)
    max_top: int = Field(100, ge=1)
    cors_origins: tuple[str, ...] = ()
    batching: bool = True
    batch_wait_ms: float = Field(5.0, ge=0)
    max_batch: int = Field(16, ge=1)
    reload_interval_s: float = Field(2.0, ge=0)
    threads: int | None = Field(None, ge=1)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
