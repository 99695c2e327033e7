"""Serving: one query's latency through `siamese-serve` against one `siamese-search` process,
throughput at 1, 4 and 16 concurrent clients with micro-batching on and off, and a bounded load
test (2,000 requests from 16 clients on 127.0.0.1, a quarter of them bad uploads).

Project: `siamese-serve` (uvicorn, 127.0.0.1 only) on `--project`, a pipeline project whose
models/, data/gallery and data/index are built (`dvc repro index_gallery`). Queries are the
gallery's own stored photos (`/api/images/{id}`), so every good answer is checkable: its first
hit is that id. Baseline: `siamese-search PHOTO --json`, one process per query (model load,
gallery read, index load, embedding), as it was the only way to search before the server.
The clients run on the same cores as the server; the figures include their share.

Run: python benchmarks/bench_serve.py --project PATH [--quick] [--no-load-test]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
from _common import Row, percentile, print_table

BIN = Path(sys.executable).parent
BAD = [
    ("text", b"not a photo\n"),
    ("empty", b""),
    ("svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>'),
    ("html", b"<!doctype html><html></html>"),
]


class Server:
    """`siamese-serve` in a subprocess on a free 127.0.0.1 port."""

    def __init__(self, project: Path, *options: str):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(BIN / "siamese-serve"), "--project", str(project), "--port", str(self.port)]
        command += ["--reload-interval", "0", "--log-level", "warning", *options]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"siamese-serve failed: {self.process.stderr.read().decode()}")
            try:
                if httpx.get(self.url + "/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("siamese-serve did not start in 300 s")
            time.sleep(0.2)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


def search(client: httpx.Client, url: str, photo: bytes, top: int = 10) -> httpx.Response:
    return client.post(url + "/api/search", files={"image": ("q.jpg", photo)}, data={"top": top})


def latencies(url: str, photos: list[tuple[str, bytes]], n: int) -> list[float]:
    out = []
    with httpx.Client(timeout=60) as client:
        search(client, url, photos[0][1])  # warm-up
        for i in range(n):
            photo_id, photo = photos[i % len(photos)]
            started = time.perf_counter()
            answer = search(client, url, photo)
            out.append(time.perf_counter() - started)
            assert answer.json()["hits"][0]["id"] == photo_id
    return out


def throughput(url: str, photos: list[tuple[str, bytes]], clients: int, each: int) -> float:
    def worker(offset: int) -> None:
        with httpx.Client(timeout=120) as client:
            for i in range(each):
                photo_id, photo = photos[(offset + i) % len(photos)]
                assert search(client, url, photo).json()["hits"][0]["id"] == photo_id

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return clients * each / (time.perf_counter() - started)


def load_test(server: Server, photos: list[tuple[str, bytes]], total: int, clients: int) -> dict:
    """`total` requests from `clients` threads, every 4th a bad upload; counts and memory."""
    lock = threading.Lock()
    stats = {"5xx": 0, "good_ok": 0, "good_wrong": 0, "bad_4xx": 0, "bad_other": 0, "done": 0}
    rss_after_200: list[float] = []
    counter = iter(range(total))

    def worker() -> None:
        with httpx.Client(timeout=120) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                if i % 4 == 3:
                    name, data = BAD[i // 4 % len(BAD)]
                    status = search(client, server.url, data).status_code
                    key = "bad_4xx" if 400 <= status < 500 else "bad_other"
                else:
                    photo_id, photo = photos[i % len(photos)]
                    answer = search(client, server.url, photo)
                    status = answer.status_code
                    right = status == 200 and answer.json()["hits"][0]["id"] == photo_id
                    key = "good_ok" if right else "good_wrong"
                with lock:
                    stats[key] += 1
                    stats["5xx"] += status >= 500
                    stats["done"] += 1
                    if stats["done"] == 200:
                        rss_after_200.append(server.rss_mb())

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats["rss_after_200_mb"] = rss_after_200[0] if rss_after_200 else float("nan")
    stats["rss_end_mb"] = server.rss_mb()
    return stats


def cli_times(project: Path, photo: Path, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            [str(BIN / "siamese-search"), str(photo), "--json", "--top", "10"],
            cwd=project, check=True, capture_output=True,
        )  # fmt: skip
        out.append(time.perf_counter() - started)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True, help="a built pipeline project")
    parser.add_argument("--quick", action="store_true", help="fewer queries, to check it runs")
    parser.add_argument("--no-load-test", action="store_true", help="skip the load test")
    args = parser.parse_args(argv)
    project = args.project.resolve()
    queries, cli_runs, each = (20, 2, 4) if args.quick else (200, 5, 16)
    total = 400 if args.quick else 2000

    server = Server(project)
    try:
        info = httpx.get(server.url + "/api/info").json()
        ids = httpx.get(server.url + "/api/similar/" + _any_id(server.url)).json()["hits"]
        photos = [(h["id"], httpx.get(server.url + h["image_url"]).content) for h in ids]
        served = latencies(server.url, photos, queries)
        rates_on = {c: throughput(server.url, photos, c, each) for c in (1, 4, 16)}
        stats = None if args.no_load_test else load_test(server, photos, total, 16)
    finally:
        server.stop()
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "query.jpg"
        photo.write_bytes(photos[0][1])
        cli = cli_times(project, photo, cli_runs)
    server = Server(project, "--no-batching")
    try:
        rates_off = {c: throughput(server.url, photos, c, each) for c in (1, 4, 16)}
    finally:
        server.stop()

    cli_p50 = percentile(cli, 50)
    rows = [
        Row("one query p50 (service vs siamese-search)", 1000 * percentile(served, 50),
            1000 * cli_p50, "ms", higher_is_better=False),
        Row("one query p95 (service vs siamese-search)", 1000 * percentile(served, 95),
            1000 * percentile(cli, 95), "ms", higher_is_better=False),
    ]  # fmt: skip
    for c in (1, 4, 16):
        rows.append(Row(f"queries/s, {c} clients (batching on vs off)", rates_on[c],
                        rates_off[c], "q/s"))  # fmt: skip
    rows.append(Row("queries/s, 16 vs 1 client, batching on", rates_on[16], rates_on[1], "q/s"))
    notes = [
        f"project {project}: {info['gallery_size']} photos, {info['backbone']}, "
        f"{info['engine']} {info['precision']}, {info['index_kind']} index, "
        f"inputs {info['input_sizes']} px",
        f"{queries} sequential queries through the service; {cli_runs} siamese-search processes",
        f"throughput: each client sends {each} queries; clients share the server's cores",
    ]
    if stats is not None:
        grown = stats["rss_end_mb"] / stats["rss_after_200_mb"] - 1
        notes.append(
            f"load test: {total} requests from 16 clients, a quarter bad uploads: "
            f"{stats['5xx']} 5xx, {stats['good_ok']} good answered right, "
            f"{stats['good_wrong']} wrong, {stats['bad_4xx']} bad refused with a 4xx, "
            f"{stats['bad_other']} bad answered otherwise; server RSS "
            f"{stats['rss_after_200_mb']:.0f} MB after 200, {stats['rss_end_mb']:.0f} MB at the "
            f"end ({100 * grown:+.1f}%)"
        )
    print_table("siamese-serve against one siamese-search process per query", rows, notes)
    if stats is not None and (
        stats["5xx"] or stats["good_wrong"] or stats["bad_other"] or grown > 0.1
    ):
        print("load test failed: see the note above", file=sys.stderr)
        return 1
    return 0


def _any_id(url: str) -> str:
    """A gallery id to start from: the first hit for a plain grey photo."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, "PNG")
    with httpx.Client(timeout=60) as client:
        return search(client, url, buffer.getvalue(), top=1).json()["hits"][0]["id"]


if __name__ == "__main__":
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    raise SystemExit(main())
