"""Published references in the report, and the report's seed-protocol columns."""

from __future__ import annotations

import json

import pandas as pd
from typer.testing import CliRunner

from featstore.data.manifest import Dataset
from featstore.report import references
from pipelines.cli import app


def _row(dataset: str, probe: str, metric: str, value: float, **kw) -> dict:
    return dict(
        dataset=dataset,
        encoder="dinov3-vits16",
        random_init=True,
        resolution=112,
        protocol="default",
        probe=probe,
        metric=metric,
        value=value,
        ci_low=value - 0.05,
        ci_high=value + 0.05,
        feature_set="abc",
        pool="",
        **kw,
    )


def test_medmnist_files_map_to_their_references(tmp_path):
    def ds(path: str) -> Dataset:
        return Dataset.model_validate(
            dict(name="x", format="medmnist", path=path, task="classification", dims=2)
        )

    assert references.dataset_key(ds("/d/breastmnist_224.npz")) == "breastmnist"
    # every reference is found from its MedMNIST file name, at any size, and only there
    for r in references.REFERENCES:
        for name in (f"{r.dataset}.npz", f"/d/{r.dataset}_224.npz"):
            assert r in references.for_dataset(ds(name))
            assert all(o.dataset == r.dataset for o in references.for_dataset(ds(name)))
    assert references.for_dataset(ds("/d/adrenalmnist3d.npz")) == []
    assert all(r.source and r.model and r.resolution for r in references.REFERENCES)


def test_report_shows_published_values_and_says_random_init(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    rows = [
        _row("breastmnist", "linear", "accuracy", 0.81, unit=""),
        _row("breastmnist", "linear", "auroc", 0.86, unit=""),
        _row("organs", "seg-linear", "dice", 0.5, unit=""),
        _row("organs", "seg-decoder", "hd95", 4.2, unit="mm"),
    ]
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    manifest = {
        "datasets": [
            dict(
                name="breastmnist",
                format="medmnist",
                path=str(tmp_path / "breastmnist.npz"),
                task="classification",
                dims=2,
            ),
            dict(
                name="organs",
                format="synthetic",
                path=str(tmp_path),
                synthetic={"kind": "seg3d"},
                task="segmentation",
                dims=3,
            ),
        ]
    }
    (out / "run-config.json").write_text(json.dumps({"manifest": manifest}))
    result = CliRunner().invoke(app, ["report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "published: MedMNIST v2" in md and "ResNet-18, trained end to end | 28 px" in md
    assert "| 0.863 | 0.901 |" in md  # accuracy, AUROC as published
    label = "dinov3-vits16 [random_init], frozen, linear probe (the paper's DINOv3-S)"
    assert f"{label} | 112 px | 0.810 [" in md
    assert "here is a random init, not pretrained weights" in md
    assert "seg-decoder / hd95 (mm)" in md  # units travel into the tables
    assert "published" not in md.split("## organs")[1]  # no reference for that dataset


def _seed_tables() -> dict[str, list[list[str]]]:
    """The seed's published-results.md as {section title: table rows (cells)}."""
    from conftest import REPO

    path = REPO.parent / "shared" / "seed" / "published-results.md"
    if not path.is_file():
        import pytest

        pytest.skip(f"{path} is absent")
    tables: dict[str, list[list[str]]] = {}
    title = ""
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            title = line[3:]
        elif line.startswith("|") and not line.startswith("|---"):
            tables.setdefault(title, []).append([c.strip() for c in line.strip("|").split("|")])
    return tables


def test_seed_references_equal_the_published_tables():
    tables = _seed_tables()
    by = {
        (r.dataset, r.metric, r.model.split(",")[0], r.model): r.value
        for r in references.REFERENCES
    }

    def ref(dataset: str, metric: str, model: str, probe: str) -> float:
        hits = [
            v
            for (d, m, name, full), v in by.items()
            if (d, m, name) == (dataset, metric, model) and probe in full
        ]
        assert len(hits) == 1, (dataset, metric, model, probe)
        return hits[0]

    t2 = next(v for k, v in tables.items() if "Table 2" in k)
    for model, nih_auc, nih_acc, rsna_auc, rsna_acc in t2[1:]:
        assert ref("nih-14", "auroc", model, "linear") == float(nih_auc)
        assert ref("nih-14", "accuracy", model, "linear") == float(nih_acc)
        assert ref("rsna-pneumonia", "auroc", model, "linear") == float(rsna_auc)
        assert ref("rsna-pneumonia", "accuracy", model, "linear") == float(rsna_acc)
    t9 = next(v for k, v in tables.items() if "Table 9" in k)
    for model, *cells in t9[1:]:
        for probe, values in (("kNN", cells[:4]), ("linear", cells[4:])):
            if not values[0]:
                continue
            probe = probe if model.startswith("DINOv3") else "as reported"
            for metric, v in zip(("auroc", "accuracy", "precision", "recall"), values, strict=True):
                assert ref("ct-rate", metric, model, probe) == float(v)
    msd = next(v for k, v in tables.items() if "Segmentation Decathlon" in k)
    for task, dino, nnunet in msd[1:]:
        key = "msd-" + task.lower().replace(" ", "-")
        assert ref(key, "dice", "DINOv3-B", "decoder") * 100 == float(dino.split()[0])
        assert ref(key, "dice", "nnU-Net", "end to end") * 100 == float(nnunet)
    wsi = next(v for k, v in tables.items() if "pathology" in k)
    for model, auc, *_ in wsi[1:]:
        assert ref("camelyon16", "auroc", model, "ABMIL") == float(auc)


def test_msd_folder_finds_the_seed_hippocampus_dice():
    ds = Dataset.model_validate(
        dict(name="hippo", format="nifti", path="/d/msd_task04_hippocampus",
             index={"glob": "imagesTr/*.nii.gz"}, task="segmentation", dims=3,
             splits={"ratios": [0.6, 0.1, 0.3]})
    )  # fmt: skip
    got = {r.model.split(",")[0]: r.value for r in references.for_dataset(ds)}
    assert references.dataset_key(ds) == "msd-hippocampus"
    assert got["DINOv3-B"] < got["nnU-Net"]
    assert references.published_model("dinov3-vitb16:random") == "DINOv3-B"
