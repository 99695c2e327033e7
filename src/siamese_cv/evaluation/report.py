"""The evaluate stage's figures, from the embeddings it already computed.

They are written under metrics/plots/ and declared as DVC plots, so `dvc plots show` renders them:
seeded test triplets and the worst failures (the original's anchor | positive | negative figure),
search grids, a t-SNE map of the test embeddings and a nearest-neighbour confusion matrix.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from siamese_cv.evaluation import figures
from siamese_cv.evaluation.metrics import neighbour_confusion
from siamese_cv.evaluation.scoring import TestSet
from siamese_cv.retrieval.grid import search_grid
from siamese_cv.retrieval.index import top_k

N_TRIPLETS = 6
N_QUERIES = 4


def _triplet_rows(
    emb: np.ndarray, images: list[bytes], names: list[str], triplets: np.ndarray
) -> list[dict]:
    rows = []
    for a, p, n in triplets:
        rows.append(
            {
                "anchor": Image.open(io.BytesIO(images[a])),
                "positive": Image.open(io.BytesIO(images[p])),
                "negative": Image.open(io.BytesIO(images[n])),
                "sim_pos": float(emb[a] @ emb[p]),
                "sim_neg": float(emb[a] @ emb[n]),
                "labels": (names[a], names[p], names[n]),
            }
        )
    return rows


def write_figures(
    out_dir: Path,
    emb: np.ndarray,
    test: TestSet,
    images: list[bytes],
    gallery_emb: np.ndarray,
    gallery_images: list[bytes],
    gallery_names: list[str],
    top: int = 10,
) -> list[Path]:
    """Draw every evaluation figure into `out_dir`; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [test.class_names[i] for i in test.labels]
    a, p, n = (np.asarray(x) for x in test.draws[0])
    triplets = np.stack([a, p, n], axis=1)
    margin = np.einsum("ij,ij->i", emb[a], emb[p]) - np.einsum("ij,ij->i", emb[a], emb[n])
    worst = triplets[np.argsort(margin, kind="stable")[:N_TRIPLETS]]
    written = [
        figures.triplet_figure(
            _triplet_rows(emb, images, names, triplets[:N_TRIPLETS]),
            out_dir / "test_triplets.png",
            "Seeded test triplets (draw 0)",
        ),
        figures.triplet_figure(
            _triplet_rows(emb, images, names, worst),
            out_dir / "worst_triplets.png",
            "Worst test triplets (largest violations)",
        ),
    ]
    queries = np.linspace(0, len(emb) - 1, N_QUERIES).astype(int)
    index, score = top_k(gallery_emb, emb[queries], top)
    for q, (hits, scores) in enumerate(zip(index, score, strict=True)):
        results = [
            {
                "image": Image.open(io.BytesIO(gallery_images[i])),
                "label": gallery_names[i],
                "score": float(s),
            }
            for i, s in zip(hits, scores, strict=True)
        ]
        written.append(
            search_grid(
                Image.open(io.BytesIO(images[queries[q]])),
                names[queries[q]],
                results,
                out_dir / f"search_{q}.png",
                f"Test query {q + 1}: top {top} in the gallery",
            )
        )
    written.append(
        figures.embedding_map(
            emb,
            test.labels,
            test.class_names,
            out_dir / "embedding_map.png",
            "t-SNE of the test embeddings",
        )
    )
    matrix = neighbour_confusion(emb, test.labels, len(test.class_names))
    written.append(
        figures.confusion_figure(
            matrix,
            test.class_names,
            out_dir / "confusion.png",
            "Nearest-neighbour confusion (test split)",
        )
    )
    return written
