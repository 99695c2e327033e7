"""Where each stage reads and writes, relative to the project root (DVC runs stages there)."""

from pathlib import Path

RAW = Path("data/raw")
PROCESSED = Path("data/processed")
TRIPLETS = Path("data/triplets")
FEATURES = Path("data/features")
PREFIX_MAPS = Path("data/prefix_maps")
GALLERY = Path("data/gallery")
COPIES = Path("data/copies")
PRETRAINED = Path("models/pretrained")
MODEL = Path("models")
METRICS = Path("metrics")
DATA_REPORT = METRICS / "data_report.json"
TEST_METRICS = METRICS / "test.json"
TRAIN_LOG = METRICS / "train"
PLOTS = METRICS / "plots"
INDEX = Path("data/index")
