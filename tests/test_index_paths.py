"""Index cells that name files outside the dataset folder (issue 32): absolute paths,
`../`, symlinks out; refused with the row and the manifest switch, allowed by it.

Every test writes a real PNG dataset in `tmp_path/data` and a real file outside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_manifest
from PIL import Image

from featstore.data import readers
from featstore.data.manifest import Dataset, load_manifest
from featstore.errors import BadInputError
from featstore.extraction.run import Options
from pipelines import extract

ENTRY = """\
  - name: d
    format: images
    path: data
    index: index.csv
    task: {task}
    dims: 2
{extra}"""


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def _data(root: Path, cells: list[str], header: str = "image,label,split") -> Path:
    """data/i0..i5.png inside, secret/out.png outside, and an index whose last row is
    `cells` (joined by commas)."""
    for i in range(6):
        _png(root / "data" / f"i{i}.png", 20 + 30 * i)
        _png(root / "data" / f"m{i}.png", 1)
    _png(root / "secret" / "out.png", 250)
    rows = [f"i{i}.png,{i % 2},{('train', 'val', 'test')[i % 3]}" for i in range(5)]
    if header.endswith("mask,split"):
        rows = [f"i{i}.png,m{i}.png,{('train', 'val', 'test')[i % 3]}" for i in range(5)]
    (root / "data" / "index.csv").write_text("\n".join([header, *rows, ",".join(cells)]) + "\n")
    return root / "data"


def _ds(data: Path, task: str = "classification", **kw: object) -> Dataset:
    return Dataset.model_validate(
        dict(name="d", format="images", path=data, index="index.csv", task=task, dims=2, **kw)
    )


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_an_image_outside_the_dataset_is_refused_naming_the_row_and_the_switch(tmp_path, kind):
    outside = tmp_path / "secret" / "out.png"
    cell = {"dotdot": "../secret/out.png", "absolute": str(outside), "symlink": "link.png"}[kind]
    data = _data(tmp_path, [cell, "1", "test"])
    if kind == "symlink":
        (data / "link.png").symlink_to(outside)
    with pytest.raises(BadInputError) as err:
        readers.list_samples(_ds(data))
    msg = str(err.value)
    assert f"{data / 'index.csv'}, line 7" in msg and repr(cell) in msg
    assert "allow_outside_paths: true" in msg and "dataset 'd'" in msg
    assert ("absolute path" if kind == "absolute" else "outside the dataset folder") in msg
    # the explicit switch reads it
    samples = readers.list_samples(_ds(data, allow_outside_paths=True))
    assert len(samples) == 6 and samples[-1].image.endswith(cell.rsplit("/", 1)[-1])


def test_a_mask_outside_the_dataset_is_refused(tmp_path):
    data = _data(tmp_path, ["i5.png", "../secret/out.png", "test"], "image,mask,split")
    with pytest.raises(BadInputError, match=r"line 7: mask '\.\./secret/out\.png' resolves"):
        readers.list_samples(_ds(data, "segmentation"))


def test_links_and_dots_that_stay_inside_are_read(tmp_path):
    data = _data(tmp_path, ["sub/../i5.png", "1", "test"])
    (data / "sub").mkdir()
    (data / "same.png").symlink_to(data / "i0.png")
    (data / "index.csv").write_text((data / "index.csv").read_text() + "same.png,0,train\n")
    linked = tmp_path / "linked"
    linked.symlink_to(data)  # the dataset folder itself may be a link
    assert len(readers.list_samples(_ds(data))) == 7
    assert len(readers.list_samples(_ds(linked))) == 7


def test_no_set_shows_an_outside_file_without_the_switch(tmp_path):
    """The stored thumbnails come only from the dataset's own files: with the switch
    off an index naming /…/secret/out.png makes no set at all."""
    _data(tmp_path, ["../secret/out.png", "1", "test"])
    mpath = write_manifest(tmp_path, ENTRY.format(task="classification", extra=""), "[]")
    manifest = load_manifest(mpath)
    with pytest.raises(BadInputError, match="allow_outside_paths"):
        extract.run(manifest, Options(progress=False), echo=lambda *_: None)
    assert not list((tmp_path / "cache").glob("*.zarr"))
    allowed = ENTRY.format(task="classification", extra="    allow_outside_paths: true\n")
    manifest = load_manifest(write_manifest(tmp_path, allowed, "[]"))
    (s,) = extract.run(manifest, Options(progress=False), echo=lambda *_: None)
    assert s.status == "new" and s.items == 6
