"""Published reference values, shown beside featstore's in the study report (no torch).

Only numbers checked against their source are listed, each with its citation, the
model and the input resolution it was measured at. MedMNIST v2's are supervised
models trained end to end; the seed paper's (Liu et al., arXiv 2509.06467 v3, copied
from ../shared/seed/published-results.md) are frozen backbones with linear probes,
kNN, a light segmentation decoder or ABMIL, as each row's model says. They place
featstore's numbers; they do not score them. Dice is stored as a fraction (the paper
prints percent). A reference of another dataset of the same kind (the seed's CREMI
VOI beside ISBI 2012's neuron instances) says so in its table row. `PUBLISHED_MODEL`
says which published row a preset corresponds to.
"""

from __future__ import annotations

import re
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
    # Shown beside datasets of this kind too, labelled with its own `dataset`:
    # "em-instances" (any dataset with `instances:`) for the seed's CREMI values.
    beside: str = ""


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


SEED = "Liu et al., Does DINOv3 Set a New Medical Vision Standard?, arXiv 2509.06467 v3"
_T2 = f"{SEED}, Table 2 (linear probe)"
_T9 = f"{SEED}, Table 9 (CT-RATE, 18 labels, macro)"
_MSD = f"{SEED}, Tables 10/11 (MSD, Dice)"
_WSI = f"{SEED}, whole-slide ABMIL on tile features"


def _seed_2d() -> tuple[Reference, ...]:
    rows = {  # model: NIH-14 AUC, ACC, RSNA-Pneumonia AUC, ACC (Table 2, 256 px)
        "BiomedCLIP": (0.7771, 0.4820, 0.8831, 0.8374),
        "DINOv3-S": (0.7788, 0.4838, 0.8667, 0.8221),
        "DINOv3-B": (0.7833, 0.4823, 0.8666, 0.8274),
        "DINOv3-L": (0.7865, 0.4674, 0.8708, 0.8209),
    }
    out = []
    for model, (nih_auc, nih_acc, rsna_auc, rsna_acc) in rows.items():
        m = f"{model}, frozen, linear probe"
        out += [
            Reference("nih-14", "auroc", nih_auc, m, "256 px", _T2),
            Reference("nih-14", "accuracy", nih_acc, m, "256 px", _T2),
            Reference("rsna-pneumonia", "auroc", rsna_auc, m, "256 px", _T2),
            Reference("rsna-pneumonia", "accuracy", rsna_acc, m, "256 px", _T2),
        ]
    return tuple(out)


def _seed_ct_rate() -> tuple[Reference, ...]:
    metrics = ("auroc", "accuracy", "precision", "recall")
    rows = {  # (model, probe): AUC, ACC, precision, recall (Table 9)
        # one row of four values in the paper, its probe not stated beside it
        ("CT-Net", "as reported"): (0.629, 0.657, 0.263, 0.575),
        ("CT-CLIP", "as reported"): (0.731, 0.707, 0.323, 0.663),
        ("DINOv3-S", "kNN"): (0.716, 0.791, 0.350, 0.275),
        ("DINOv3-B", "kNN"): (0.737, 0.729, 0.374, 0.541),
        ("DINOv3-L", "kNN"): (0.709, 0.797, 0.423, 0.250),
        ("DINOv3-S", "linear probe"): (0.778, 0.722, 0.370, 0.690),
        ("DINOv3-B", "linear probe"): (0.798, 0.741, 0.390, 0.688),
        ("DINOv3-L", "linear probe"): (0.791, 0.722, 0.374, 0.728),
    }
    return tuple(
        Reference("ct-rate", metric, value, f"{model}, {probe}", "not stated", _T9)
        for (model, probe), values in rows.items()
        for metric, value in zip(metrics, values, strict=True)
    )


def _seed_msd() -> tuple[Reference, ...]:
    rows = {  # task: DINOv3-B, nnU-Net (Dice %, Tables 10/11)
        "brain-tumour": (66.8, 78.9),
        "heart": (78.2, 89.4),
        "liver": (84.1, 96.2),
        "hippocampus": (75.3, 84.1),
        "prostate": (79.8, 91.3),
        "lung": (73.1, 75.8),
        "pancreas": (78.9, 82.7),
        "hepatic-vessel": (64.8, 67.9),
        "spleen": (86.4, 94.8),
        "colon": (49.1, 52.6),
    }
    out = []
    for task, (dino, nnunet) in rows.items():
        out += [
            Reference(f"msd-{task}", "dice", dino / 100, "DINOv3-B, frozen, light decoder",
                      "not stated", _MSD),
            Reference(f"msd-{task}", "dice", nnunet / 100, "nnU-Net, trained end to end",
                      "not stated", _MSD),
        ]  # fmt: skip
    out.append(
        Reference("msd-spleen", "dice", 0.912, "DINOv3-L, frozen, light decoder",
                  "not stated", _MSD)
    )  # fmt: skip
    return tuple(out)


def _seed_wsi() -> tuple[Reference, ...]:
    rows = {"DINOv3-S": 0.840, "DINOv3-B": 0.805, "UNI": 0.965, "CONCH": 0.961, "ResNet-50": 0.842}
    return tuple(
        Reference("camelyon16", "auroc", v, f"{m}, frozen tiles, ABMIL", "not stated", _WSI)
        for m, v in rows.items()
    )


_EM = f"{SEED}, 'Where DINOv3 fails' (CREMI-A, VOI)"


def _seed_cremi() -> tuple[Reference, ...]:
    """CREMI-A's VOI (split + merge, lower is better): another dataset than any here
    (no CREMI data reaches this machine), shown beside the EM instance datasets."""
    rows = {"DINOv3-L, frozen": 1.78, "CAD (a classic EM method)": 0.57}
    return tuple(
        Reference("cremi-a", "voi", v, m, "not stated", _EM, beside="em-instances")
        for m, v in rows.items()
    )


REFERENCES += _seed_2d() + _seed_ct_rate() + _seed_msd() + _seed_wsi() + _seed_cremi()

# Which published model a featstore preset corresponds to (the seed's "DINOv3-S" is the
# ViT-S/16 distilled from the 7B; its timm twin is the same weights).
PUBLISHED_MODEL: dict[str, str] = {
    "dinov3-vits16": "DINOv3-S",
    "dinov3-vitb16": "DINOv3-B",
    "dinov3-vitl16": "DINOv3-L",
    "timm:vit_small_patch16_dinov3.lvd1689m": "DINOv3-S",
    "timm:vit_base_patch16_dinov3.lvd1689m": "DINOv3-B",
    "timm:vit_large_patch16_dinov3.lvd1689m": "DINOv3-L",
    "biomedclip": "BiomedCLIP",
}
_MSD_FOLDER = re.compile(r"^msd_task\d\d_(.+)$", re.IGNORECASE)


def published_model(encoder: str) -> str:
    """The seed paper's name for `encoder` (a preset), or "" when it reports none."""
    return PUBLISHED_MODEL.get(encoder.removesuffix(":random"), "")


def dataset_key(ds: Dataset) -> str:
    """The canonical name references use: a MedMNIST file's dataset (`breastmnist.npz`
    and MedMNIST+'s `breastmnist_224.npz` are both "breastmnist"), an MSD task folder
    (`msd_task04_hippocampus` is "msd-hippocampus"), else the name."""
    if ds.format == "medmnist":
        return Path(ds.path).name.removesuffix(".npz").split("_")[0].lower()
    msd = _MSD_FOLDER.match(Path(ds.path).name)
    if msd:
        return "msd-" + msd[1].lower().replace("_", "-")
    return ds.name.lower()


def kind(ds: Dataset) -> str:
    """The kind of data `ds` is, for references measured on other data of that kind
    (`Reference.beside`): "em-instances" for a dataset with `instances:`, else ""."""
    return "em-instances" if ds.instances is not None else ""


def for_dataset(ds: Dataset) -> list[Reference]:
    """The published values for `ds`, in table order (may be empty): its own, and
    those of other datasets of its kind (`Reference.beside`)."""
    key, of_kind = dataset_key(ds), kind(ds)
    return [r for r in REFERENCES if r.dataset == key or (of_kind and r.beside == of_kind)]
