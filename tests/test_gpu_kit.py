"""The GPU kit (benchmarks/gpu/): the wheelhouse check, and the whole run as a dry run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "benchmarks" / "gpu"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_kit_{name}", KIT / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


wheels = _module("wheels")


def _wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any"):
    """A real (empty) wheel file whose METADATA lists `requires`."""
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def _check(folder: Path, python: str = "3.12", pins=("alpha==1.0",)):
    return wheels.check_folder(
        folder,
        python,
        pinned=[Requirement(p) for p in pins],
        have={"numpy": Version("2.5.2"), "pandas": None},
        roots=[Requirement("alpha>=1"), Requirement("numpy>=1.26")],
    )


def test_a_missing_dependency_of_a_wheel_is_found_with_markers_and_extras(tmp_path):
    reqs = [
        "beta>=2",
        "numpy>=1.24",
        "pandas>=2.2",  # in the image, version unread: a note
        "gamma; python_version < '3.12'",  # a backport: only for 3.11
        "delta; extra == 'docs'",  # an extra nobody asked for
    ]
    _wheel(tmp_path, "alpha", "1.0", reqs)
    problems, notes = _check(tmp_path)
    assert len(problems) == 1 and "alpha needs beta>=2: neither a wheel here" in problems[0]
    assert any("pandas>=2.2" in n for n in notes)
    _wheel(tmp_path, "beta", "2.1", [])
    assert _check(tmp_path)[0] == []
    eleven, _ = _check(tmp_path, "3.11")
    assert any("alpha needs gamma" in p for p in eleven)


def test_versions_pins_tags_and_duplicates_are_checked(tmp_path):
    _wheel(tmp_path, "alpha", "1.0", ["beta>=3", "numpy>=3"])
    _wheel(tmp_path, "beta", "2.1", [], tag="cp311-cp311-manylinux_2_17_x86_64")
    problems, _ = _check(tmp_path, pins=("alpha==1.0", "omega==1"))
    text = "\n".join(problems)
    assert "alpha needs beta>=3; the wheelhouse has 2.1" in text
    assert "alpha needs numpy>=3; the image has 2.5.2" in text
    assert "omega==1: wheels.txt pins it, absent" in text
    assert "no tag for CPython 3.12" in text
    _wheel(tmp_path, "alpha", "1.1", [])
    assert any("a second wheel of alpha" in p for p in _check(tmp_path)[0])


def test_the_shipped_pins_are_exact_and_hold_for_both_pythons():
    for python in ("3.11", "3.12"):
        pinned = wheels.pins(python)
        assert pinned and all(str(p.specifier).startswith("==") for p in pinned)
    assert len(wheels.pins("3.11")) > len(wheels.pins("3.12"))  # the backports


@pytest.mark.parametrize("tag", ["cp312", "cp311"])
def test_the_downloaded_wheelhouse_is_complete(tag):
    folder = REPO / ".whl" / tag
    if not any(folder.glob("*.whl")):
        pytest.skip(f"no wheels in {folder}: `make gpu-wheels` downloads them")
    problems, _ = wheels.check_folder(folder, f"{tag[2]}.{tag[3:]}")
    assert problems == []
    # the pins are the versions this .venv runs (checked where the wheels were fetched,
    # not on every clean clone: a registry release must not fail CI's test run)
    assert wheels.untested(wheels.pins("3.11")) == []


@pytest.mark.slow
def test_the_gpu_run_works_as_a_dry_run_on_the_cpu(tmp_path):
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    if not any((REPO / ".whl" / tag).glob("*.whl")):
        pytest.skip(f"no wheels in .whl/{tag}: `make gpu-wheels` downloads them")
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    run = subprocess.run(
        [str(KIT / "run.sh"), "--dry-run"], env=env, capture_output=True, text=True, timeout=1800
    )
    assert run.returncode == 0, run.stdout[-4000:]
    res = json.loads((tmp_path / "gpu-results.json").read_text())
    steps = {s["name"]: s for s in res["steps"]}
    assert list(steps) == ["install", "env", "preflight", "tests", "cluster", "bench"]
    assert res["ok"] and all(s["rc"] == 0 for s in steps.values())
    imported = {line.split()[0]: line for line in steps["env"]["log_tail"].splitlines() if line}
    assert "/site/zarr/" in imported["zarr"] and "/site/dask/" in imported["dask"]  # wheels
    assert res["tests"]["tests"] >= 3 and res["tests"]["failures"] == 0
    assert res["tests"]["skipped"] == 0  # FEATSTORE_GPU_STANDIN=cpu runs every one
    assert steps["cluster"]["data"]["byte_identical"] is True
    rows = steps["bench"]["data"]["rows"]
    assert len(rows) == 8  # 2 models x 2 sizes x 2 placements
    assert all(r["pipe_img_s"] > 0 and r["steady_units"] >= 2 for r in rows)
    md = (tmp_path / "gpu-results.md").read_text()
    assert "## gpu_extract.py" in md and "byte_identical" in md
