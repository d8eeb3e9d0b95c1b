"""Study report: two tiny encoders x two resolutions, extract -> probe -> report."""

from __future__ import annotations

import json

from conftest import save_tiny_vit, synth_entry, write_manifest
from PIL import Image
from transformers import DINOv3ViTConfig, DINOv3ViTModel
from typer.testing import CliRunner

from pipelines.cli import app


def test_report_names_every_cell_and_plots_are_pngs(tmp_path, tiny_dinov3):
    wide = tmp_path / "tiny-wide"
    save_tiny_vit(
        DINOv3ViTConfig,
        DINOv3ViTModel,
        wide,
        seed=2,
        hidden_size=48,
        intermediate_size=96,
        num_register_tokens=1,
    )
    datasets = synth_entry("lesions", "cls2d", n=24) + synth_entry("organs", "seg3d", n=8)
    mpath = write_manifest(tmp_path, datasets, f"['{tiny_dinov3}', '{wide}']", "[32, 48]")
    args = ["--manifest", str(mpath)]
    out = tmp_path / "results"
    runner = CliRunner()
    for cmd in (
        ["extract", *args],
        ["probe", *args, "--out", str(out)],
        ["report", "--out", str(out)],
    ):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    for enc in (tiny_dinov3.name, "tiny-wide", "pixels:8"):
        for res in (32, 48):
            assert f"{enc} @ {res}px" in md
    assert "**" in md and "All encoders are pretrained." in md
    pngs = sorted((out / "plots").glob("*.png"))
    assert {p.name for p in pngs} >= {
        "resolution.png",
        "size.png",
        "linear_vs_knn.png",
        "examples_lesions.png",
        "examples_organs.png",
    }
    for p in pngs:
        with Image.open(p) as im:
            im.verify()
            assert im.format == "PNG"
        assert f"plots/{p.name}" in md and f"plots/{p.name}" in (out / "report.html").read_text()
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert runner.invoke(app, ["report", "--out", str(out)]).exit_code == 0
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    assert before == after  # unchanged results: nothing rewritten


def test_report_says_random_init(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    row = dict(
        dataset="d",
        encoder="dinov3-vits16",
        random_init=True,
        resolution=224,
        protocol="default",
        probe="linear",
        metric="auroc",
        value=0.7,
        ci_low=0.6,
        ci_high=0.8,
        feature_set="abc",
        pool="",
    )
    import pandas as pd

    pd.DataFrame([row]).to_csv(out / "results.csv", index=False)
    manifest = {
        "datasets": [
            {
                "name": "d",
                "format": "synthetic",
                "path": str(tmp_path),
                "synthetic": {"kind": "cls2d"},
                "task": "classification",
                "dims": 2,
            }
        ]
    }
    (out / "run-config.json").write_text(json.dumps({"manifest": manifest}))
    assert CliRunner().invoke(app, ["report", "--out", str(out)]).exit_code == 0
    assert "**Random-init encoders:** dinov3-vits16" in (out / "report.md").read_text()


def test_task_table_shows_rows_that_differ_only_in_a_key_column():
    """Two pools of one set are two results: the table keeps both and says which is which."""
    from featstore.probing.rows import ResultRow, frame
    from featstore.report.tables import task_table

    rows = [
        ResultRow("v", "e", False, 32, pool=pool, probe="linear", metric="auroc", value=v)
        for pool, v in (("mean", 0.7), ("max", 0.9))
    ]
    table = task_table(frame(rows), "classification")
    assert len(table) == 2
    cells = {idx: row["linear / auroc"] for idx, row in table.iterrows()}
    assert "0.700" in cells["e @ 32px, pool mean"] and "0.900" in cells["e @ 32px, pool max"]


def test_task_table_refuses_rows_that_differ_outside_the_key():
    """Rows with one key but different values are one result twice: refused, not dropped."""
    import pandas as pd
    import pytest

    from featstore.errors import ProbeError
    from featstore.probing.rows import ResultRow, frame
    from featstore.report.tables import task_table

    rows = [
        ResultRow("v", "e", False, 32, feature_set=k, probe="linear", metric="auroc", value=v)
        for k, v in (("aaa", 0.7), ("bbb", 0.9))
    ]
    with pytest.raises(ProbeError, match="differ only outside the result key"):
        task_table(frame(rows), "classification")
    extra = frame(rows[:1])
    extra = pd.concat([extra, extra.assign(site="b", value=0.1)], ignore_index=True)
    with pytest.raises(ProbeError, match=r"\['site'\]"):
        task_table(extra, "classification")


def test_a_results_file_without_scores_is_an_error_naming_it(tmp_path):
    header = "dataset,encoder,random_init,resolution,feature_set,probe,metric,value\n"
    (tmp_path / "results.csv").write_text(header)
    (tmp_path / "run-config.json").write_text(json.dumps({"manifest": {"datasets": []}}))
    result = CliRunner().invoke(app, ["report", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "results.csv holds no scores" in result.output, result.output


def test_the_resolution_legend_fits_inside_its_figure(monkeypatch, tmp_path):
    """Eight encoders with long labels on one panel: every legend entry lies inside the
    figure and below the axes' labels (the comparison study's legend was cut off)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from featstore.probing.rows import ResultRow, frame
    from featstore.report import tables

    names = ["dinov3-vits16", "dinov3-vitb16", "biomedclip", "rad-dino"]
    names += ["dinov2-vits14", "dinov2-vitb14", "pixels", "timm:vit_large_patch16_dinov3.lvd1689m"]
    rows = [
        ResultRow("d", e, e != "pixels", r, probe="linear", metric="auroc", value=0.5 + i / 20)
        for i, e in enumerate(names)
        for r in (112, 224)
    ]
    shown = []
    monkeypatch.setattr(tables, "save_figure", lambda fig, path: shown.append(fig) or True)
    assert tables.plot_resolution(frame(rows), {"d": "classification"}, tmp_path / "r.png")
    fig = shown[0]
    renderer = FigureCanvasAgg(fig).get_renderer()
    box = fig.legends[0].get_window_extent(renderer)
    assert len(fig.legends[0].get_texts()) == len(names)
    assert box.x0 >= 0 and box.x1 <= fig.bbox.width and box.y0 >= 0, (box, fig.bbox)
    (ax,) = fig.axes
    assert box.y1 <= ax.get_tightbbox(renderer).y0  # below the x label, not over it


def test_models_are_ordered_by_size_across_families():
    """Small before base before large, whatever the family; folders after the presets."""
    from featstore.report.tables import size_rank

    names = ["/models/mine", "rad-dino", "dinov2-vitb14", "biomedclip", "dinov3-vitb16"]
    names += ["dinov2-vits14", "dinov3-vits16", "timm:vit_large_patch16_dinov3.lvd1689m"]
    ordered = sorted(names, key=lambda e: (size_rank(e), e))
    small, base, large, folder = ordered[:2], ordered[2:6], ordered[6], ordered[7]
    assert set(small) == {"dinov3-vits16", "dinov2-vits14"} and ordered[0] == "dinov3-vits16"
    assert set(base) == {"dinov3-vitb16", "biomedclip", "dinov2-vitb14", "rad-dino"}
    assert (large, folder) == ("timm:vit_large_patch16_dinov3.lvd1689m", "/models/mine")


def test_a_result_without_an_interval_says_so():
    """A score from one test unit has NaN bounds: the table says '[no interval]'."""
    from featstore.probing.rows import ResultRow, frame
    from featstore.report.tables import task_table

    nan = float("nan")
    rows = [
        ResultRow(
            "v", "e", False, 32, probe="seg-linear", metric=m, value=0.5, ci_low=nan, ci_high=nan
        )
        for m in ("dice", "iou", "hd95")
    ]
    table = task_table(frame(rows), "segmentation")
    assert table.iloc[0]["seg-linear / dice"].strip("*") == "0.500 [no interval]"
