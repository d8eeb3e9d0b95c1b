"""Versions that meet in one cache: sets written by earlier releases' code (format 2,
tests/fixtures/format2; format 3, before zarr sharding, tests/fixtures/format3) and
one claiming a newer format, met by this one."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from typer.testing import CliRunner

from featstore.data.manifest import load_manifest
from featstore.extraction.run import Options
from featstore.store.sets import FeatureSet
from pipelines import extract
from pipelines.cli import app

runner = CliRunner()


def _run(mpath: Path):
    m = load_manifest(mpath)
    return extract.run(m, Options(progress=False), baseline=False, echo=lambda *_: None)


FIXTURES = REPO / "tests" / "fixtures"  # format<N>: written by an earlier release


@pytest.fixture(params=[2, 3])
def old_set(request, tmp_path):
    """An earlier format's fixture in a cache of its own, the manifest that made it,
    and its format."""
    (old,) = (FIXTURES / f"format{request.param}").glob("*.zarr")
    shutil.copytree(old, tmp_path / "cache" / old.name)
    shutil.copy(old.parent / "manifest.yaml", tmp_path / "manifest.yaml")
    return tmp_path / "manifest.yaml", tmp_path / "cache" / old.name, request.param


def _files(path: Path) -> dict[str, bytes]:
    return {
        str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()
    }


def test_a_set_of_an_earlier_format_is_never_reused(old_set):
    """A set written by an earlier release (tests/fixtures/format2, format3): opening
    it is refused with the fix, verify says 'another format' (not damage, not edited
    attributes), ls shows its format, and an extract of the same request makes a new
    set of this format beside it and leaves the old one as it was."""
    import featstore
    from featstore.errors import DataAbsentWarning, StoreIncompleteError, StoreMismatchError
    from featstore.identity import FORMAT_VERSION
    from featstore.store.sets import open_set

    mpath, old, fmt = old_set
    before = _files(old)
    assert FeatureSet(old).attrs["featstore_format"] == fmt and FORMAT_VERSION == 4
    refusal = rf"{old}.* another featstore format \({fmt}, this one reads 4\); re-extract it"
    with pytest.raises(StoreMismatchError, match=refusal):
        open_set(old)
    result = runner.invoke(app, ["verify", str(old)])
    assert result.exit_code == 1 and re.search(refusal, result.output), result.output
    assert "edited" not in result.output and "missing" not in result.output
    assert len(result.output.strip().splitlines()) == 1  # only the format is judged
    m = load_manifest(mpath)
    absent = pytest.warns(DataAbsentWarning)  # the data is made by the extract below
    with absent, pytest.raises(StoreIncompleteError, match="no complete feature set"):
        featstore.open_features(m, "d", "pixels:8")  # not found by a request
    (made,) = _run(mpath)
    assert made.status == "new" and made.path != old and made.path.parent == old.parent
    assert FeatureSet(made.path).attrs["featstore_format"] == 4
    assert _files(old) == before  # untouched
    assert (
        featstore.open_features(m, "d", "pixels:8")
        .attrs["cache_key"]
        .startswith(made.path.name.removesuffix(".zarr"))
    )
    listed = runner.invoke(app, ["ls", str(old.parent)]).output.splitlines()
    assert "format" in listed[0]
    by_key = {line.split()[-1]: line.split()[-2] for line in listed[1:]}
    assert by_key == {old.name[:12]: str(fmt), made.path.name[:12]: "4"}


def test_a_set_of_a_newer_format_is_refused_naming_both_versions(old_set):
    from featstore.errors import StoreMismatchError
    from featstore.store.sets import open_set

    _, path, _ = old_set
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["featstore_format"] = 5  # as a later featstore would write it
    (path / "zarr.json").write_text(json.dumps(meta))
    newer = r"another featstore format \(5, this one reads 4\); it was made by a newer featstore"
    with pytest.raises(StoreMismatchError, match=rf"{newer}: upgrade featstore"):
        open_set(path)
    result = runner.invoke(app, ["verify", str(path)])
    assert result.exit_code == 1 and re.search(newer, result.output), result.output
