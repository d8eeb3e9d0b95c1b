"""Results files: keys that round-trip, writes that a kill cannot tear, results that
never collide (encoder labels, report groups), several manifests in one folder."""

from __future__ import annotations

import os
import signal
import string
import subprocess
import sys
import time
from dataclasses import replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, save_tiny_vit, synth_entry, write_manifest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from featstore import places
from featstore.errors import ProbeError
from featstore.probing.rows import MEAN_OF_REPEATS, ResultRow, frame, key_strings
from pipelines.cli import app
from pipelines.probe import write_results

runner = CliRunner()
WORDS = st.sampled_from(["", "007", "nan", "NA", "None", "True", "1e5", "a,b", 'q"x', " sp"])
TEXT = WORDS | st.text(string.ascii_letters + string.digits + " ,.-_'\"", max_size=8)
FRACTION = st.fractions(Fraction(1, 1000), 1, max_denominator=1000).map(float) | st.just(np.nan)
ROW = st.builds(
    ResultRow,
    dataset=TEXT,
    encoder=TEXT,
    random_init=st.booleans(),
    resolution=st.integers(1, 4096),
    feature_set=TEXT,
    pool=TEXT,
    protocol=TEXT,
    probe=TEXT,
    metric=TEXT,
    value=st.floats(allow_nan=True, allow_infinity=False, width=32),
    train_fraction=FRACTION,
    shots=st.integers(0, 1000),
    repeat=st.integers(MEAN_OF_REPEATS, 50),
    task=TEXT,
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=st.lists(ROW, min_size=1, max_size=8))
def test_keys_written_and_read_back_are_the_same_keys(tmp_path_factory, rows):
    """Any rows (fractions like 1/3, names like '007' or 'nan') written by the real
    writer and read back by the real reader have the keys they were written with, so
    a rerun of the same rows replaces them and adds none."""
    from featstore.probing.results_file import read_results

    out = tmp_path_factory.mktemp("keys")
    # a cell is scored on one feature set (a second set supersedes the first: upsert)
    sets = {(r.dataset, r.encoder, r.random_init, r.resolution): r.feature_set for r in rows}
    rows = [
        replace(r, feature_set=sets[r.dataset, r.encoder, r.random_init, r.resolution])
        for r in rows
    ]
    unique = list({k: r for k, r in zip(key_strings(frame(rows)), rows, strict=True)}.values())
    write_results(out, unique)
    back = read_results(out / "results.csv")
    assert sorted(key_strings(back)) == sorted(key_strings(frame(unique)))
    again, stale = write_results(out, unique)  # a rerun: the same rows, replaced
    assert len(again) == len(unique) and stale.empty
    assert len(read_results(out / "results.csv")) == len(unique)


def test_a_third_is_one_key_in_files_written_before_keys_were_exact(tmp_path):
    """An older results.csv holds 0.333333 for the fraction 1/3: a rerun still replaces it."""
    row = ResultRow("d", "e", False, 32, "k", probe="linear", metric="auroc", train_fraction=1 / 3)
    old = frame([row]).assign(train_fraction=0.333333)
    old.to_csv(tmp_path / "results.csv", index=False, float_format="%.6g")
    df, _ = write_results(tmp_path, [row])
    assert len(df) == 1


@pytest.mark.parametrize(
    ("cell", "column"), [("abc", "resolution"), ("maybe", "random_init"), ("1.5", "shots")]
)
def test_an_unparsable_results_csv_is_refused_before_probing(tmp_path, cell, column):
    mpath = write_manifest(tmp_path, synth_entry("d", "cls2d"), "['pixels:8']")
    out = tmp_path / "out"
    rows = [ResultRow("d", "e", False, 32, "k", probe=p, metric="auroc") for p in ("a", "b")]
    write_results(out, rows)
    csv = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    csv.loc[1, column] = cell
    csv.to_csv(out / "results.csv", index=False)
    before = (out / "results.csv").read_bytes()
    result = runner.invoke(app, ["probe", "--manifest", str(mpath), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"results.csv, line 3, column '{column}': '{cell}'" in result.output
    assert "move it away" in result.output and "probed" not in result.output
    assert (out / "results.csv").read_bytes() == before


WRITERS = {
    "results": "from pipelines.probe import write_results\n"
    "from featstore.probing.rows import ResultRow\n"
    "write_results(out, [ResultRow('d', 'e', False, 32, 'old', probe='p', metric='m', value=1)])",
    "attention": "import numpy as np\n"
    "from featstore.probing.classification import Attention\n"
    "from featstore.probing.evaluation import SetResult\n"
    "from pipelines.probe import _save_attention\n"
    "a = Attention(np.arange(3), np.ones(3, np.float32) / 3)\n"
    "_save_attention(out, SetResult(out, 'key', [], attention=a))",
    "predictions": "import numpy as np\n"
    "from featstore.probing.predictions import Key, Predictions, write_predictions\n"
    "k = Key('d', 'e', False, 32, '', 'default', 'linear', 'key')\n"
    "p = Predictions(k, 'classification', np.array(['a', 'b']), truth=np.array([0, 1]),\n"
    "    scores=np.array([[0.9, 0.1], [0.2, 0.8]]))\n"
    "write_predictions(out / 'predictions', p)",
}
TARGETS = {"attention": "attention/key.npz", "predictions": "predictions/d-key-linear.parquet"}


@pytest.mark.parametrize("what", sorted(WRITERS))
def test_a_kill_during_a_results_write_leaves_the_previous_file_whole(tmp_path, what):
    out = tmp_path / "out"
    if what == "results":
        write_results(out, [ResultRow("d", "e", False, 32, "old", probe="p", metric="m")])
        target = out / "results.csv"
    else:
        target = out / TARGETS[what]
        target.parent.mkdir(parents=True)
        target.write_bytes(b"the previous file, whole")
    before = target.read_bytes()
    paused = tmp_path / "paused"
    code = f"from pathlib import Path\nout = Path({str(out)!r})\n{WRITERS[what]}\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), places.TEST_PAUSE: f"results:{paused}"},
    )
    deadline = time.time() + 120
    while not paused.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the write never paused at 'results' (exit {proc.poll()})")
        time.sleep(0.01)
    assert list(target.parent.glob(f"{target.name}.*.tmp"))  # the new bytes, aside
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    assert target.read_bytes() == before


def test_repeats_zero_is_refused_not_read_as_one(tmp_path):
    import featstore

    mpath = write_manifest(tmp_path, synth_entry("d", "cls2d"), "['pixels:8']")
    with pytest.raises(ProbeError, match=r"repeats 0: give a whole number >= 1"):
        featstore.probe(mpath, fractions=[0.5, 1.0], repeats=0)


def _probe(mpath: Path, out: Path) -> str:
    for cmd in (["extract", "--manifest", str(mpath)], ["probe", "--manifest", str(mpath)]):
        result = runner.invoke(app, [*cmd, *(["--out", str(out)] if cmd[0] == "probe" else [])])
        assert result.exit_code == 0, result.output
    return result.output


def test_two_checkpoint_folders_named_model_are_refused(tmp_path, tiny_dinov3):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    a, b = tmp_path / "a" / "model", tmp_path / "b" / "model"
    for seed, folder in enumerate((a, b)):
        save_tiny_vit(DINOv3ViTConfig, DINOv3ViTModel, folder, seed=seed + 3)
    mpath = write_manifest(tmp_path, synth_entry("d", "cls2d", n=16), f"['{a}', '{b}']")
    assert runner.invoke(app, ["extract", "--manifest", str(mpath)]).exit_code == 0
    out = tmp_path / "out"
    result = runner.invoke(app, ["probe", "--manifest", str(mpath), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"encoders '{a}', '{b}' all show as 'model' (d @ 32px)" in result.output
    assert "its own name" in result.output and not (out / "results.csv").exists()


def _data_file(root: Path) -> Path:
    return next(p for p in sorted(root.rglob("*.png")))


def test_the_manifest_changed_note_only_when_it_did(tmp_path):
    """Changed data gives a new set: the note says the data changed. A changed manifest
    (another storage dtype) gives a new set: only then does it say the manifest changed."""
    from PIL import Image

    mpath = write_manifest(tmp_path, synth_entry("d", "cls2d", n=24), "['pixels:8']")
    out = tmp_path / "out"
    assert "earlier rows" not in _probe(mpath, out)
    img = _data_file(tmp_path / "data" / "d")
    pixels = np.asarray(Image.open(img)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(img)
    said = _probe(mpath, out)
    assert "scored another feature set (the data changed since)" in said, said
    assert "manifest" not in said.split("scored another")[1].split(";")[0]
    mpath.write_text(mpath.read_text().replace("cache: cache\n", "cache: cache\ndtype: float32\n"))
    said = _probe(mpath, out)
    assert "scored another feature set (the manifest changed since)" in said, said


def test_two_manifests_in_one_results_folder_make_one_report(tmp_path):
    """`make probe`, `make probe MANIFEST=other.yaml`, `make report`: the report places
    both manifests' datasets (the rows carry their task); rows that give no task and are
    not in the last manifest are named as left out, never a traceback."""
    out = tmp_path / "results"
    first, second = tmp_path / "one", tmp_path / "two"
    for folder in (first, second):
        folder.mkdir()
    m1 = write_manifest(first, synth_entry("lesions", "cls2d", n=24), "['pixels:8']")
    m2 = write_manifest(second, synth_entry("organs", "seg2d", n=12), "['pixels:8']")
    _probe(m1, out)
    _probe(m2, out)
    result = runner.invoke(app, ["report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    md = (out / "report.md").read_text()
    assert "## lesions (classification)" in md and "## organs (segmentation, 2D)" in md
    assert "probed with another manifest" in md
    # an older results.csv: no task column; lesions is in no manifest the report has
    csv = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    csv.drop(columns=["task"]).to_csv(out / "results.csv", index=False)
    result = runner.invoke(app, ["report", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "note: the rows of lesions give no task" in result.output
    md = (out / "report.md").read_text()
    assert "Left out: the rows of lesions" in md and "## organs" in md


def _curve_rows(pools: tuple[str, ...]) -> pd.DataFrame:
    rows = []
    for pool in pools:
        for fraction, value in ((0.5, 0.6), (1.0, 0.8 if pool == "mean" else 0.7)):
            rows.append(
                ResultRow(
                    "v", "e", False, 32, "k", pool=pool, probe="linear", metric="auroc",
                    value=value, ci_low=value, ci_high=value, n_train=10,
                    train_fraction=fraction, repeat=MEAN_OF_REPEATS, task="classification",
                )
            )  # fmt: skip
    return frame(rows)


def test_label_efficiency_table_and_plot_keep_pools_apart(tmp_path, monkeypatch):
    from featstore.report import curves

    df = _curve_rows(("mean", "max"))
    table = curves.labels_to_reach(df, {"v": "classification"})
    assert sorted(table.model) == ["e @ 32px, pool max", "e @ 32px, pool mean"]
    assert sorted(table["full score"]) == ["0.700", "0.800"]
    drawn = {}
    monkeypatch.setattr(curves, "save_figure", lambda fig, path: drawn.setdefault("fig", fig))
    curves.plot_label_efficiency(df, {"v": "classification"}, tmp_path / "le.png")
    (ax,) = drawn["fig"].axes
    assert sorted(line.get_label() for line in ax.get_lines()) == sorted(table.model)


def test_report_plots_and_published_table_keep_pools_apart(tmp_path, monkeypatch):
    from featstore.report import tables
    from featstore.report.references import Reference

    df = _curve_rows(("mean", "max"))
    df = df[df.train_fraction == 1.0].assign(repeat=0)
    drawn = {}
    monkeypatch.setattr(tables, "save_figure", lambda fig, path: drawn.setdefault(path.name, fig))
    tables.plot_resolution(df, {"v": "classification"}, tmp_path / "resolution.png")
    tables.plot_size(df, {"v": "classification"}, tmp_path / "size.png")
    assert len(drawn["resolution.png"].axes[0].containers) == 2  # an errorbar line per pool
    legend = drawn["size.png"].axes[0].get_legend().get_texts()
    assert sorted(t.get_text() for t in legend) == ["v, pool max", "v, pool mean"]
    # a score that could not be computed (NaN) is left out of the size plot, not a crash
    nan = df.assign(value=float("nan"), ci_low=float("nan"), ci_high=float("nan"))
    assert (
        tables.plot_size(
            pd.concat([df, nan.assign(resolution=64)]),
            {"v": "classification"},
            tmp_path / "size.png",
        )
        is not None
    )
    ref = Reference("v", "auroc", 0.9, "model", "32", "paper")
    pub = tables.published_table(df, [ref])
    assert len(pub) == 3 and pub.model.str.contains("pooling").sum() == 2
