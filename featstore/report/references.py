"""Published reference values, shown beside featstore's in the study report (no torch).

Only numbers checked against their source are listed, each with its citation, the
model and the input resolution it was measured at. They are supervised models
trained end to end, not frozen-feature probes, so they place featstore's numbers,
they do not score them. None come from the DINOv3 seed paper (arXiv 2509.06467):
its abstract, the only part of it at hand, gives no numbers, so e.g. its MSD
Hippocampus Dice is not listed; add a row here, with its table, when you have it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from featstore.data.manifest import Dataset

MEDMNIST_V2 = (
    "MedMNIST v2, Yang et al., Scientific Data 10:41 (2023), Table 3 (test split, "
    "mean of at least three runs)"
)


@dataclass(frozen=True)
class Reference:
    """One published value: `metric` uses featstore's metric names."""

    dataset: str  # canonical name, e.g. "breastmnist" (see `dataset_key`)
    metric: str  # "accuracy" | "auroc" | "dice"
    value: float
    model: str
    resolution: str  # the model's input size, as published
    source: str


REFERENCES: tuple[Reference, ...] = (
    Reference("breastmnist", "auroc", 0.901, "ResNet-18, trained end to end", "28 px", MEDMNIST_V2),
    Reference(
        "breastmnist", "accuracy", 0.863, "ResNet-18, trained end to end", "28 px", MEDMNIST_V2
    ),
    Reference(
        "breastmnist", "accuracy", 0.833, "ResNet-18, trained end to end", "224 px", MEDMNIST_V2
    ),
    Reference(
        "pneumoniamnist", "auroc", 0.944, "ResNet-18, trained end to end", "28 px", MEDMNIST_V2
    ),
    Reference(
        "pneumoniamnist", "accuracy", 0.854, "ResNet-18, trained end to end", "28 px", MEDMNIST_V2
    ),
    Reference(
        "pneumoniamnist", "auroc", 0.956, "ResNet-18, trained end to end", "224 px", MEDMNIST_V2
    ),
    Reference(
        "pneumoniamnist", "accuracy", 0.864, "ResNet-18, trained end to end", "224 px", MEDMNIST_V2
    ),
)


def dataset_key(ds: Dataset) -> str:
    """The canonical name references use: a MedMNIST file's dataset (`breastmnist.npz`
    and MedMNIST+'s `breastmnist_224.npz` are both "breastmnist"), else the name."""
    if ds.format == "medmnist":
        return Path(ds.path).name.removesuffix(".npz").split("_")[0].lower()
    return ds.name.lower()


def for_dataset(ds: Dataset) -> list[Reference]:
    """The published values for `ds`, in table order (may be empty)."""
    key = dataset_key(ds)
    return [r for r in REFERENCES if r.dataset == key]
