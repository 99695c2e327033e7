"""Every endpoint of the served tiny project, and every bad input, on a real gallery."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pipeline_project import run
from served import (
    app_for,
    build_project,
    copy_project,
    gallery_rows,
    source_photo,
    stored_image,
)

from siamese_cv.retrieval.engine import SearchEngine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served_project(tmp_path_factory):
    return build_project(tmp_path_factory)


@pytest.fixture(scope="module")
def client(served_project):
    with TestClient(app_for(served_project), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def rows(served_project):
    return gallery_rows(served_project)


def upload(client, data: bytes, name: str = "photo.jpg", **form):
    return client.post("/api/search", files={"image": (name, data)}, data=form)


def png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "PNG")
    return buffer.getvalue()


def test_health_and_info_describe_the_served_outputs(client, served_project, rows):
    assert client.get("/api/health").json()["status"] == "ok"
    info = client.get("/api/info").json()
    config = json.loads((served_project / "models/config.json").read_text())
    assert info["model_fingerprint"] == config["fingerprint"]
    assert info["backbone"] == "tiny" and info["embedding_dim"] == 512
    assert info["gallery_size"] == len(rows) == 12 and info["index_kind"] == "exact"
    assert info["classes"] == sorted({r["label_name"] for r in rows})
    assert info["engine"] == "torch" and info["image_size"] == 64


def test_a_gallery_photo_uploaded_comes_first_with_score_near_one(client, served_project, rows):
    row = rows[4]
    data = source_photo(served_project, row["id"]).read_bytes()
    body = upload(client, data, top="5").json()
    assert body["top"] == 5 and len(body["hits"]) == 5
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]
    first = body["hits"][0]
    assert first["id"] == row["id"] and first["label_name"] == row["label_name"]
    assert first["score"] > 0.99  # the original photo; the gallery embedded its JPEG re-encoding
    assert body["query"]["bytes"] == len(data) and body["query"]["width"] > 64
    assert body["took_ms"] > 0


def test_similar_by_id_uses_the_stored_vector(client, rows):
    body = client.get(f"/api/similar/{rows[7]['id']}", params={"top": 3}).json()
    assert body["query_id"] == rows[7]["id"] and body["query"] is None
    assert body["hits"][0]["id"] == rows[7]["id"]
    assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    scores = [h["score"] for h in body["hits"]]
    assert scores == sorted(scores, reverse=True)


def test_the_api_answers_what_siamese_search_answers(client, served_project, rows):
    photo = source_photo(served_project, rows[2]["id"])
    cli = json.loads(
        run(served_project, "siamese-search", str(photo), "--json", "--top", "8").stdout
    )
    api = upload(client, photo.read_bytes(), top="8").json()["hits"]
    assert [h["id"] for h in api] == [h["id"] for h in cli]
    assert [h["label_name"] for h in api] == [h["label_name"] for h in cli]
    assert np.allclose([h["score"] for h in api], [h["score"] for h in cli], atol=1e-5)


def test_copies_of_the_query_come_first_marked_with_the_rule(client, served_project, rows):
    """What the copy rule flags over data/copies, computed here from the files, leads the hits;
    the API and siamese-search mark the same copies."""
    from siamese_cv.retrieval.copies import copy_embedder_of, find_copies, load_copy_gallery

    copies = load_copy_gallery(served_project / "data/copies", [r["id"] for r in rows])
    assert copies is not None
    embedder = copy_embedder_of(copies, served_project / "models/pretrained")
    engine = SearchEngine.load(served_project)
    marked = 0
    for row in rows[:6]:
        photo = source_photo(served_project, row["id"])
        vector = embedder.embed_images([engine.prepare(photo)])
        expected = find_copies(vector, copies.vectors, copies.rule)[0]
        body = upload(client, photo.read_bytes(), top="6").json()
        assert body["copy_rule"] == copies.rule.describe() == engine.copy_rule()
        hits = body["hits"]
        flags = [h["copy"] for h in hits]
        assert flags == [True] * len(expected) + [False] * (len(hits) - len(expected)), row
        assert [h["id"] for h in hits[: len(expected)]] == [rows[r]["id"] for r, _ in expected]
        assert np.allclose([h["copy_score"] for h in hits if h["copy"]], [s for _, s in expected])
        assert all(h["copy_score"] is None for h in hits if not h["copy"])
        assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
        assert len({h["id"] for h in hits}) == len(hits)  # a copy is not listed again below
        cli = run(served_project, "siamese-search", str(photo), "--top", "6").stdout.splitlines()
        assert [line.endswith(")") and " copy (" in line for line in cli] == flags
        marked += bool(expected)
    assert marked >= 3  # the photos themselves, re-encoded by preprocess, are copies


def test_without_data_copies_nothing_is_marked(served_project, rows, tmp_path):
    project = copy_project(served_project, tmp_path / "project")
    shutil.rmtree(project / "data/copies")
    engine = SearchEngine.load(project)
    hits = engine.search(source_photo(project, rows[0]["id"]), 4)
    assert engine.copy_rule() is None and engine.info()["copy_rule"] is None
    assert hits[0].id == rows[0]["id"] and not any(h.copy for h in hits)


def test_a_stored_image_embeds_to_its_own_gallery_vector(client, served_project, rows):
    for row in rows[:3]:
        data = client.get(f"/api/images/{row['id']}").content
        first = upload(client, data, top="1").json()["hits"][0]
        assert first["id"] == row["id"]
        assert first["score"] > 0.99999  # torch in fp32 here, as export_gallery ran


def test_images_are_the_stored_bytes_by_id(client, served_project, rows):
    response = client.get(f"/api/images/{rows[0]['id']}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.content == stored_image(served_project, rows[0]["id"])
    for hit in upload(client, response.content, top="3").json()["hits"]:
        assert client.get(hit["image_url"]).content == stored_image(served_project, hit["id"])


def test_a_label_limits_the_hits_to_that_class(client, rows):
    label = rows[-1]["label_name"]
    photo = client.get(f"/api/images/{rows[0]['id']}").content
    body = upload(client, photo, top="10", label=label).json()
    assert body["label"] == label and len(body["hits"]) == 4  # the class's 4 gallery photos
    assert {h["label_name"] for h in body["hits"]} == {label}
    similar = client.get(f"/api/similar/{rows[0]['id']}", params={"label": label}).json()
    assert {h["label_name"] for h in similar["hits"]} == {label}


def _truncated_jpeg(client, rows) -> bytes:
    data = client.get(f"/api/images/{rows[0]['id']}").content
    return data[: len(data) // 2]


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buffer, "PNG")  # 144 megapixels in a few kB
    return buffer.getvalue()


BAD_UPLOADS = {
    "text": (b"just some words, not a photo\n", 400, "not an image (text)"),
    "zero bytes": (b"", 400, "empty (zero bytes)"),
    "svg": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', 400, "SVG"),
    "html": (b"<!doctype html><html><body>404</body></html>", 400, "not an image (HTML)"),
    "bomb": (_bomb(), 413, "megapixel limit (a decompression bomb?)"),
}


@pytest.mark.parametrize("name", [*BAD_UPLOADS, "truncated"])
def test_a_bad_upload_is_a_4xx_with_one_line(client, rows, name):
    if name == "truncated":
        data, status, words = _truncated_jpeg(client, rows), 400, "truncated JPEG"
    else:
        data, status, words = BAD_UPLOADS[name]
    response = upload(client, data)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert words in detail and detail.startswith("image: ") and "\n" not in detail
    assert "Traceback" not in response.text
    assert client.get("/api/health").status_code == 200  # still serving


def test_limits_on_upload_size_and_pixels(served_project, rows):
    app = app_for(served_project, max_upload_mb=0.05, max_pixels=4000)
    with TestClient(app, raise_server_exceptions=False) as client:
        big = upload(client, np.random.default_rng(0).bytes(200_000))
        assert big.status_code == 413 and "over the 0.05 MB upload limit" in big.json()["detail"]

        def chunks():  # no Content-Length: counted while it arrives
            for _ in range(10):
                yield b"x" * 20_000

        streamed = client.post(
            "/api/search",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        )
        assert streamed.status_code == 413 and "upload limit" in streamed.json()["detail"]
        many = upload(client, png((80, 80)))  # 6,400 pixels > 4,000
        assert many.status_code == 413 and "80x80" in many.json()["detail"]
        ok = upload(client, png((60, 60)))
        assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("request_", "status", "words"),
    [
        (("post", "/api/search", {"data": {"top": "3"}}), 422, "image: missing"),
        (
            ("post", "/api/search", {"data": {"top": "0"}, "photo": True}),
            422,
            "top: 0 is out of range",
        ),
        (("post", "/api/search", {"data": {"top": "101"}, "photo": True}), 422, "ask for 1 to 100"),
        (("post", "/api/search", {"data": {"top": "many"}, "photo": True}), 422, "top: "),
        (
            ("post", "/api/search", {"data": {"label": "pizza"}, "photo": True}),
            422,
            "'pizza' is not a class",
        ),
        (
            ("get", "/api/similar/no-such-photo.jpg", {}),
            404,
            "no gallery photo has id 'no-such-photo.jpg'",
        ),
        (("get", "/api/similar/x", {"params": {"top": 500}}), 422, "top: 500 is out of range"),
        (("get", "/api/images/no-such-photo.jpg", {}), 404, "no gallery photo has id"),
        (("get", "/api/images/..%2F..%2Fparams.yaml", {}), 404, "no gallery photo has id"),
        (("get", "/api/nothing", {}), 404, "no such page"),
        (("delete", "/api/search", {}), 405, "method not allowed"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_bad_request_is_a_4xx_with_one_line(client, rows, request_, status, words):
    method, path, kwargs = request_
    kwargs = dict(kwargs)
    if kwargs.pop("photo", False):
        kwargs["files"] = {"image": ("p.png", png((32, 32)))}
    response = client.request(method.upper(), path, **kwargs)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and words in detail and "\n" not in detail


def test_metrics_docs_and_the_page(client, rows):
    client.get(f"/api/similar/{rows[0]['id']}")
    metrics = client.get("/metrics").text
    assert (
        'siamese_requests_total{method="GET",route="/api/similar/{photo_id:path}",status="200"}'
        in metrics
    )
    assert "siamese_request_seconds_bucket" in metrics and "siamese_gallery_size 12.0" in metrics
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/similar/{photo_id}", "/api/images/{photo_id}"} <= set(
        schema["paths"]
    )
    page = client.get("/").text
    assert "Reverse image search" in page and 'type="file"' in page
    for asset in ("/static/app.js", "/static/style.css"):
        text = client.get(asset).text
        assert text and "://" not in text.replace("http://www.w3.org", "")  # no CDN: offline
    assert "://" not in page


def test_cors_is_off_unless_an_origin_is_named(client, served_project):
    asked = {"origin": "https://elsewhere.example", "access-control-request-method": "POST"}
    assert "access-control-allow-origin" not in client.options("/api/search", headers=asked).headers
    assert "access-control-allow-origin" not in client.get("/api/info", headers=asked).headers
    app = app_for(served_project, cors_origins=("https://elsewhere.example",))
    with TestClient(app) as open_client:
        answer = open_client.get("/api/info", headers=asked)
        assert answer.headers["access-control-allow-origin"] == "https://elsewhere.example"


def test_queries_batched_together_give_the_vectors_of_one_at_a_time(served_project, rows):
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from siamese_cv.serve.batcher import MicroBatcher

    engine = SearchEngine.load(served_project)
    images = [engine.prepare(stored_image(served_project, r["id"])) for r in rows[:5]]
    alone = np.concatenate([engine.embed([image]) for image in images])
    alone_copies = np.stack([engine.embed_queries([image])[0].copy_vector for image in images])
    sizes: list[int] = []

    async def together() -> list[np.ndarray]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(pool, wait_s=0.05, max_batch=4, on_batch=sizes.append)
            batcher.start()
            try:
                return await asyncio.gather(*(batcher.embed(engine, i) for i in images))
            finally:
                await batcher.stop()

    async def alone_in_a_long_window() -> np.ndarray:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(pool, wait_s=3600, max_batch=4)  # an hour's window
            batcher.start()
            try:  # nothing else is coming: it does not wait for the window
                return await asyncio.wait_for(batcher.embed(engine, images[0]), 120)
            finally:
                await batcher.stop()

    assert np.allclose(asyncio.run(alone_in_a_long_window()).vector, alone[0], atol=1e-6)
    queries = asyncio.run(together())
    batched = np.stack([q.vector for q in queries])
    assert sizes == [4, 1]  # queued together: one batch of the cap, then the rest
    assert np.allclose(batched, alone, atol=1e-6)
    assert np.allclose(np.stack([q.copy_vector for q in queries]), alone_copies, atol=1e-6)
    top = engine.search_vectors(batched, 5)
    assert [[h.id for h in hits] for hits in top] == [
        [h.id for h in hits] for hits in engine.search_vectors(alone, 5)
    ]
