"""`siamese-serve`: the reverse image search on http://127.0.0.1:8000 (uvicorn)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from siamese_cv.core.errors import UserError, run_cli
from siamese_cv.serve.settings import Settings

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    d = Settings()
    parser = argparse.ArgumentParser(
        prog="siamese-serve",
        description="Serve the pipeline's model, gallery and index: a web page at / and an "
        "HTTP API under /api (OpenAPI at /docs).",
    )
    parser.add_argument(
        "--project", type=Path, default=d.project_dir, help="the pipeline project (default: .)"
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it "
        "to the network)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=d.max_upload_mb,
        help=f"largest upload accepted (default {d.max_upload_mb:g})",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=d.max_pixels,
        help=f"largest image accepted, in pixels (default {d.max_pixels})",
    )
    parser.add_argument(
        "--max-top",
        type=int,
        default=d.max_top,
        help=f"most results a query may ask for (default {d.max_top})",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. https://app.example.org) call the API; "
        "repeatable; default: CORS off",
    )
    parser.add_argument(
        "--no-batching", action="store_true", help="embed each query alone (default: batch)"
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=d.batch_wait_ms,
        help=f"how long a query waits for others to batch with (default {d.batch_wait_ms:g})",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=d.max_batch,
        help=f"most queries per batch (default {d.max_batch})",
    )
    parser.add_argument(
        "--reload-interval",
        type=float,
        default=d.reload_interval_s,
        help="seconds between checks for new pipeline outputs; 0: never reload "
        f"(default {d.reload_interval_s:g})",
    )
    parser.add_argument("--threads", type=int, help="CPU threads for the network")
    parser.add_argument(
        "--log-level", default="info", choices=("debug", "info", "warning", "error")
    )
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    from pydantic import ValidationError

    try:
        return Settings(
            project_dir=args.project,
            max_upload_mb=args.max_upload_mb,
            max_pixels=args.max_pixels,
            max_top=args.max_top,
            cors_origins=tuple(args.cors_origin),
            batching=not args.no_batching,
            batch_wait_ms=args.batch_wait_ms,
            max_batch=args.max_batch,
            reload_interval_s=args.reload_interval,
            threads=args.threads,
        )
    except ValidationError as error:
        first = error.errors()[0]
        name = "--" + str(first["loc"][0]).replace("_", "-")
        raise UserError(f"{name}: {first['msg']}") from None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = settings_from(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import uvicorn

    from siamese_cv.retrieval.engine import SearchEngine
    from siamese_cv.serve.app import create_app

    engine = SearchEngine.load(settings.project_dir, threads=settings.threads)  # fails here, once
    app = create_app(settings, engine)
    logger.info("serving %s on http://%s:%d", settings.project_dir, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    return 0


def cli() -> None:
    sys.exit(run_cli(main))


if __name__ == "__main__":
    cli()
