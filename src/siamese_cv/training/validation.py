"""Validation after each epoch: embed the validation split as the exported model will, and score it.

The scores decide which epoch is kept (`MONITOR`); the validation loss is the training loss on
the head's output for the fixed validation triplets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from siamese_cv.evaluation.metrics import (
    expected_triplet_accuracy,
    retrieval_metrics,
    triplet_accuracy,
)
from siamese_cv.inference.embedder import Embedder
from siamese_cv.models.ensemble import mean_of_normalised
from siamese_cv.models.siamese import EmbeddingNet, Preprocessing
from siamese_cv.training.feature_cache import as_input
from siamese_cv.training.settings import FitData, FitSettings

MONITOR = "val_map_at_r"


@dataclass
class Validator:
    """Scores what is kept (the model, or its moving average) on the validation split.

    Attributes:
        scored: the network whose weights would be kept.
        rest: with a cache, the trainable rest of `scored`'s backbone (run on `features`);
            None embeds the images with the whole backbone.
        features: with a cache, the cached validation prefix outputs, one per inference size.
        loss_fn: the training loss, scored on the head's output.
    """

    scored: EmbeddingNet
    rest: torch.nn.Module | None
    features: list[torch.Tensor] | None
    data: FitData
    prep: Preprocessing
    settings: FitSettings
    loss_fn: torch.nn.Module

    def __call__(self) -> tuple[dict[str, float], list[torch.Tensor]]:
        """(the validation loss and scores, the embeddings they score, one per inference size)."""
        self.scored.eval()
        head, outputs = self.embed()
        val = self.data.val
        row = {"val_loss": validation_loss(head, val.labels, self.data.val_triplets, self.loss_fn)}
        row.update(
            validation_scores(mean_of_normalised(outputs), val.labels, self.data.val_triplets)
        )
        return row, outputs

    def embed(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(the head's output at the first inference size, what would be exported at each size).

        With a cache, only the trainable rest runs, on each size's cached prefix outputs;
        without, the whole backbone embeds the images. The exported model combines the sizes as
        `mean_of_normalised` does.
        """
        precision, batch_size = self.settings.precision, self.settings.batch_size_eval
        heads, outputs = [], []
        for i, size in enumerate(self.prep.sizes):
            if self.features is not None:
                features = self.features[i]
                with torch.inference_mode(), precision.autocast():
                    pooled = torch.cat(
                        [
                            self.rest(as_input(features[j : j + batch_size], precision)).float()
                            for j in range(0, len(features), batch_size)
                        ]
                    )
            else:
                at_size = replace(self.prep, input_sizes=(size,))
                backbone = self.scored.backbone
                embedder = Embedder(backbone, at_size, precision, batch_size, normalize=False)
                pooled = torch.from_numpy(embedder.embed_encoded(self.data.val.encoded))
                pooled = pooled.to(precision.device)
            with torch.inference_mode(), precision.autocast():
                head = self.scored.head(pooled).float()
            heads.append(head)
            outputs.append(pooled if self.settings.embed_from == "pooled" else head)
        return heads[0], outputs


def validation_loss(
    head_out: torch.Tensor, labels: np.ndarray, triplets: np.ndarray, loss_fn: torch.nn.Module
) -> float:
    """The training loss on the head's output for the validation images."""
    with torch.no_grad():
        lab = torch.as_tensor(labels, device=head_out.device)
        idx = tuple(torch.as_tensor(triplets[:, i], device=head_out.device) for i in range(3))
        return float(loss_fn(head_out, lab, idx))


def validation_scores(exported: torch.Tensor, labels: np.ndarray, triplets: np.ndarray) -> dict:
    """The validation metrics of an embedding (what will be exported), by which epochs are kept."""
    emb = torch.nn.functional.normalize(exported.float(), dim=1).cpu().numpy()
    retrieval = retrieval_metrics(emb, labels, recall_at=(1,))
    return {
        "val_triplet_accuracy": triplet_accuracy(
            emb, triplets[:, 0], triplets[:, 1], triplets[:, 2]
        ),
        "val_expected_triplet_accuracy": expected_triplet_accuracy(emb, labels),
        "val_precision_at_1": retrieval["precision_at_1"],
        "val_map_at_r": retrieval["map_at_r"],
    }
