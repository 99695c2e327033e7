"""`siamese-serve`: the reverse image search as an HTTP API and a web page (FastAPI).

`create_app(Settings(project_dir=...))` is what the command and the tests run; see
docs/serving.md for the endpoints.
"""

from siamese_cv.serve.app import create_app
from siamese_cv.serve.settings import Settings

__all__ = ["Settings", "create_app"]
