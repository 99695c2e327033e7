"""The names each registry offers, importable without torch: what params.yaml may choose from.

`config.params` validates against these tuples; each registry (backbones, heads, poolings,
losses, miners) checks at import that it registers exactly these names, so the two cannot drift
apart and a params check never has to import the networks.
"""

from __future__ import annotations

from collections.abc import Iterable

# models/backbones.py; "timm:<name>" is accepted besides these
BACKBONES = ("efficientnet_lite0", "efficientnet_lite2", "resnet18", "resnet34", "resnet50")
# registered for the tests, accepted in params.yaml, but never offered in lists or messages
HIDDEN_BACKBONES = ("tiny",)
HEADS = ("seed", "linear", "mlp", "identity")  # models/siamese.py
POOLINGS = ("avg", "gem", "avgmax")  # models/pooling.py; avg keeps the backbone's own
LOSSES = (  # training/losses.py
    "triplet_l2sq",
    "triplet_cosine",
    "multi_similarity",
    "proxy_anchor",
    "normalized_softmax",
)
PROXY_LOSSES = ("normalized_softmax", "proxy_anchor")  # one learned vector per class, no miner
MINERS = ("none", "semihard", "batch_hard", "multi_similarity")  # training/losses.py
RESIZE_MODES = ("stretch", "shorter_side_crop")  # data/images.py
ENCODE_FORMATS = ("jpeg", "png", "webp")  # data/images.py: how preprocess stores photos
ENGINES = ("torch", "onnxruntime")  # what runs the embedder's network (inference/embedder.py)
INDEX_KINDS = ("exact", "ivf")  # retrieval/index.py


def check_registered(family: str, registered: Iterable[str], declared: Iterable[str]) -> None:
    """Fail at import when a registry and its declared names differ (a programming error).

    Raises:
        RuntimeError: naming the names registered but not declared, and declared but not
            registered.
    """
    registered, declared = set(registered), set(declared)
    if registered != declared:
        raise RuntimeError(
            f"{family} registry and siamese_cv.config.choices disagree: registered only "
            f"{sorted(registered - declared)}, declared only {sorted(declared - registered)}"
        )
