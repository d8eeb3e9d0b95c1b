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
    assert "dinov3-vits16 [random_init], frozen, linear probe | 112 px | 0.810 [" in md
    assert "here is a random init, not pretrained weights" in md
    assert "seg-decoder / hd95 (mm)" in md  # units travel into the tables
    assert "published" not in md.split("## organs")[1]  # no reference for that dataset
