"""The served outputs follow the pipeline: a re-export is swapped in live, a mismatch is a 503,
and the ONNX Runtime gallery embeds its own stored photos to their vectors."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from pipeline_project import apply_params, run
from served import app_for, build_project, copy_project, gallery_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_project(tmp_path_factory)


def wait_for(check, what: str, timeout: float = 120.0):
    """Poll `check()` until it returns something truthy (the watcher reloads in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_re_export_is_swapped_in_while_a_request_is_in_flight(built, tmp_path):
    root = copy_project(built, tmp_path / "project")
    old_ids = {r["id"] for r in gallery_rows(root)}
    photo_id = sorted(old_ids)[0]
    with TestClient(app_for(root, reload_interval_s=0.1)) as client:
        photo = client.get(f"/api/images/{photo_id}").content
        old = client.app.state.holder.current()
        entered, release = threading.Event(), threading.Event()
        embed = old.embed

        def held_embed(images):  # the in-flight request waits here until the swap is done
            entered.set()
            assert release.wait(120)
            return embed(images)

        old.embed = held_embed
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(
                client.post, "/api/search", files={"image": ("q.jpg", photo)}, data={"top": "30"}
            )
            assert entered.wait(60)
            apply_params(root, {"export.splits": "[train, test]"})
            run(root, "dvc", "repro", "index_gallery")
            new_size = len(gallery_rows(root))
            assert new_size == 21
            wait_for(lambda: client.get("/api/info").json().get("gallery_size") == new_size, "swap")
            release.set()
            answer = in_flight.result(timeout=120)
        assert answer.status_code == 200
        hits = answer.json()["hits"]
        assert len(hits) == len(old_ids) and {h["id"] for h in hits} == old_ids  # the old gallery
        assert hits[0]["id"] == photo_id
        fresh = client.post("/api/search", files={"image": ("q.jpg", photo)}, data={"top": "30"})
        assert len(fresh.json()["hits"]) == 21 and fresh.json()["hits"][0]["id"] == photo_id
        assert answer.json()["copy_rule"] and fresh.json()["copy_rule"] is None  # copies stale
        test_id = next(r["id"] for r in gallery_rows(root) if r["split"] == "test")
        assert client.get(f"/api/similar/{test_id}").json()["hits"][0]["id"] == test_id
        assert client.app.state.holder.swaps == 1
        assert "siamese_output_swaps_total 1.0" in client.get("/metrics").text


def test_a_gallery_of_another_model_is_refused_with_a_503(built, tmp_path):
    root = copy_project(built, tmp_path / "project")
    meta_path = root / "data/gallery/meta.json"
    original = meta_path.read_text()
    photo_id = gallery_rows(root)[0]["id"]

    def replace_meta(text: str) -> None:  # as dvc checkout does: a new file renamed into place
        (root / "data/gallery/meta.json.new").write_text(text)
        os.replace(root / "data/gallery/meta.json.new", meta_path)

    with TestClient(app_for(root, reload_interval_s=0.1)) as client:
        photo = client.get(f"/api/images/{photo_id}").content
        replace_meta(json.dumps({**json.loads(original), "model_fingerprint": "0123456789abcdef"}))
        refused = wait_for(
            lambda: (r := client.get("/api/health")).status_code == 503 and r, "the 503"
        )
        assert "dvc repro export_gallery" in refused.json()["detail"]
        for response in (
            client.post("/api/search", files={"image": ("q.jpg", photo)}),
            client.get(f"/api/similar/{photo_id}"),
            client.get(f"/api/images/{photo_id}"),
            client.get("/api/info"),
        ):
            assert response.status_code == 503
            assert "another model" in response.json()["detail"]
        replace_meta(original)
        wait_for(lambda: client.get("/api/health").status_code == 200, "serving again")
        hits = client.post("/api/search", files={"image": ("q.jpg", photo)}).json()["hits"]
        assert hits[0]["id"] == photo_id


def test_the_onnx_gallery_embeds_its_stored_photos_to_their_own_vectors(built, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    root = copy_project(built, tmp_path / "project")
    apply_params(root, {"export.engine": "onnxruntime", "export.precision": "fp32"})
    run(root, "dvc", "repro", "index_gallery")
    with TestClient(app_for(root)) as client:
        info = client.get("/api/info").json()
        assert info["engine"] == "onnxruntime" and info["precision"] == "fp32"
        for row in gallery_rows(root):
            photo = client.get(f"/api/images/{row['id']}").content
            first = client.post("/api/search", files={"image": ("q.jpg", photo)}).json()["hits"][0]
            # the score of a photo with itself is the cosine of the query with its stored vector
            assert first["id"] == row["id"] and first["score"] > 0.99999, first
