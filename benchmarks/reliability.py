"""Hostile input and corrupted feature sets through the real CLI: a reliability table.

    python benchmarks/reliability.py            # about 3-4 minutes on 2 CPU cores
    python benchmarks/reliability.py --only TIFF,slide,results.csv   # those inputs alone

Part 1 runs a fixed list of hostile inputs (issue 11, and the cases of
tests/test_hostile.py) through `featstore extract` / `featstore probe` as
subprocesses, each in its own temp folder, mostly with the `pixels:8` encoder (no
model); the decompression bomb also runs through a tiny DINOv3 saved with
`save_pretrained`. Each outcome is classified from the exit code and the output:

    refused     exit 2, one `error: ...` line naming what the case expects, no traceback
    accepted    exit 0 (for `--skip-bad` cases: and the bad samples counted as skipped)
    traceback   a Python traceback anywhere in the output
    unclear     refused, but the message does not name the file/field/line expected
    timeout     no answer within 60 s

Part 2 damages one chunk of every array of a real feature set (flip a byte,
truncate, delete; the logic of tests/test_trust.py), edits its attributes and its
zarr.json, and counts how many `featstore verify` reports with a `FAIL` line.
Exit status 1 when any case misses its expectation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

FEATSTORE = str(Path(sys.executable).parent / "featstore")
TIMEOUT = 60
SPLITS = ("train", "val", "test")
PIXELS = "cache: cache\nencoders: ['pixels:8']\nbaseline: null\nresolutions: [32]\nbatch_size: 4\n"
IMAGES = "  - {name: d, format: images, path: data, index: index.csv, task: %s, dims: 2%s}\n"
VOLUMES = "  - {name: v, format: %s, path: data, index: index.csv, task: classification, dims: 3}\n"


# ------------------------------------------------------------------ inputs


def png(path: Path, value: int = 40, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, np.uint8)).save(path)


def png_header(path: Path, width: int, height: int) -> None:
    """A ~100-byte PNG whose header claims `width` x `height` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1) * 4)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def images(
    root: Path,
    rows: list[str] | None = None,
    header: str = "image,label,split",
    task: str = "classification",
    extra: str = "",
    top: str = PIXELS,
) -> list[str]:
    """An images dataset (one 8x8 PNG per row) and its manifest; returns extract args."""
    rows = rows or [f"i{i}.png,{i % 2},{SPLITS[i % 3]}" for i in range(6)]
    for row in rows:
        if row.split(",")[0]:
            png(root / "data" / row.split(",")[0], 20 + 30 * len(row) % 200)
    (root / "data" / "index.csv").write_text("\n".join([header, *rows]) + "\n")
    (root / "m.yaml").write_text(top + "datasets:\n" + IMAGES % (task, extra))
    return ["extract", "--manifest", "m.yaml", "--workers", "0"]


def manifest(root: Path, text: str | bytes, command: str = "extract") -> list[str]:
    """A manifest with a real images dataset beside it, so only the manifest is hostile."""
    images(root)
    path = root / "m.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return [command, "--manifest", "m.yaml"] + (["--workers", "0"] if command == "extract" else [])


def billion_laughs() -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]")
    return "\n".join([*lines, "datasets: [*l9]", ""])


def with_file(edit: Callable[[Path], None], **kw) -> Callable[[Path], list[str]]:
    """An images dataset in which `edit` then damages something."""

    def setup(root: Path) -> list[str]:
        args = images(root, **kw)
        edit(root / "data")
        return args

    return setup


def tiny_dinov3(folder: Path) -> Path:
    """As tests/conftest.py `tiny_dinov3`: a 2-block DINOv3, 8-px patches, 2 registers,
    saved with save_pretrained into `folder` (once)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.manual_seed(1)
    cfg = DINOv3ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        patch_size=8, image_size=32, num_register_tokens=2,
    )  # fmt: skip
    DINOv3ViTModel(cfg).eval().save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]})
    )
    return folder


def nifti_bomb(root: Path) -> list[str]:
    import nibabel as nib

    (root / "data").mkdir(parents=True)
    header = nib.Nifti1Header()
    header.set_data_shape((3000, 3000, 3000))
    header.set_data_dtype(np.float32)
    (root / "data" / "v.nii").write_bytes(header.binaryblock + bytes(68))
    (root / "data" / "index.csv").write_text("image,label,split\nv.nii,0,train\n")
    (root / "m.yaml").write_text(PIXELS + "datasets:\n" + VOLUMES % "nifti")
    return ["extract", "--manifest", "m.yaml", "--workers", "0"]


def dicom_without_pixels(root: Path) -> list[str]:
    import pydicom
    from pydicom.data import get_testdata_file

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ct.PixelData
    (root / "data" / "s").mkdir(parents=True)
    ct.save_as(root / "data" / "s" / "a.dcm")
    (root / "data" / "index.csv").write_text("image,label,split\ns,0,train\n")
    (root / "m.yaml").write_text(PIXELS + "datasets:\n" + VOLUMES % "dicom")
    return ["extract", "--manifest", "m.yaml", "--workers", "0"]


def seg_with_stray_mask_value(root: Path) -> list[str]:
    """Masks of class 1 on a declared [bg, lesion], but m3.png also holds a 5."""
    (root / "data").mkdir(parents=True)
    for i in range(6):
        mask = np.zeros((8, 8), np.uint8)
        mask[2:5, 2:5] = 5 if i == 3 else 1
        Image.fromarray(mask).save(root / "data" / f"m{i}.png")
    rows = [f"i{i}.png,m{i}.png,{SPLITS[i % 3]}" for i in range(6)]
    return images(root, rows, "image,mask,split", "segmentation", ", classes: [bg, lesion]")


SLIDES = (
    "  - {name: s, format: wsi, path: data, index: index.csv, task: classification, dims: 2, "
    "tiling: {%s}}\n"
)


def slides(
    root: Path,
    rows: list[str],
    tiling: str = "tile_mpp: 0.5, tile_size: 64",
    dpi: int | None = None,
) -> list[str]:
    """Pyramidal TIFF slides (tifffile, 1024 px at 0.5 um/px) named by `rows`
    ("name,label,split,mpp"; a name with 'blank' is glass only), their manifest; `dpi`:
    level 0's resolution tags replaced by that many pixels per inch."""
    import tifffile

    from featstore.data.synthetic_slides import GLASS, slide_image, write_slide

    (root / "data").mkdir(parents=True)
    for i, row in enumerate(rows):
        name = row.split(",")[0]
        image = slide_image(np.random.default_rng(i), 1024, i % 2)
        write_slide(root / "data" / name, np.full_like(image, GLASS) if "blank" in name else image)
        if dpi is not None:
            with tifffile.TiffFile(root / "data" / name, mode="r+b") as tf:
                tags = tf.pages[0].tags
                tags["XResolution"].overwrite((dpi, 1))
                tags["YResolution"].overwrite((dpi, 1))
                tags["ResolutionUnit"].overwrite(2)  # inch
    (root / "data" / "index.csv").write_text("image,label,split,mpp\n" + "\n".join(rows) + "\n")
    (root / "m.yaml").write_text(PIXELS + "datasets:\n" + SLIDES % tiling)
    return ["extract", "--manifest", "m.yaml", "--workers", "0"]


def outside_row(cell: str) -> Callable[[Path], list[str]]:
    """An images dataset whose index gains a row naming `cell` (never written)."""

    def setup(root: Path) -> list[str]:
        args = images(root)
        with (root / "data" / "index.csv").open("a") as f:
            f.write(f"{cell},1,test\n")
        return args

    return setup


def tiff_image(write: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    """An images dataset whose i4 is the TIFF that `write` makes (issue 32's layouts)."""

    def setup(root: Path) -> list[str]:
        args = images(root)
        write(root / "data" / "i4.tif")
        index = root / "data" / "index.csv"
        index.write_text(index.read_text().replace("i4.png", "i4.tif"))
        return args

    return setup


def tiff_stack(write: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    """A stack dataset of three 3-page TIFF volumes, v1's made by `write`."""

    def setup(root: Path) -> list[str]:
        import tifffile

        (root / "data").mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(3):
            volume = rng.integers(0, 255, (3, 32, 32), np.uint8)
            tifffile.imwrite(root / "data" / f"v{i}.tif", volume, photometric="minisblack")
        write(root / "data" / "v1.tif")
        rows = [f"v{i}.tif,{i % 2},{SPLITS[i]}" for i in range(3)]
        (root / "data" / "index.csv").write_text("image,label,split\n" + "\n".join(rows) + "\n")
        (root / "m.yaml").write_text(PIXELS + "datasets:\n" + VOLUMES % "stack")
        return ["extract", "--manifest", "m.yaml", "--workers", "0"]

    return setup


VOLUME_SET = (
    "  - {name: v, format: %s, path: data, index: index.csv, task: segmentation, dims: 3,\n"
    "     classes: [bg, fg], volume: {raw: volumes/raw, labels: volumes/labels, "
    "resolution: resolution}}\n"
)


def write_volume(path: Path, raw: np.ndarray, labels: np.ndarray, raw_at: str = "volumes/raw"):
    """`raw` and `labels` in an HDF5 file (.h5) or a Zarr v3 group (.zarr), CREMI-like."""
    if path.suffix == ".h5":
        import h5py

        with h5py.File(path, "w") as f:
            f.create_dataset(raw_at, data=raw, chunks=(1, *raw.shape[1:]))
            f[raw_at].attrs["resolution"] = (40.0, 4.0, 4.0)
            f.create_dataset("volumes/labels", data=labels)
        return
    import zarr

    group = zarr.open_group(path, mode="w", zarr_format=3)
    for inner, arr in ((raw_at, raw), ("volumes/labels", labels)):
        group.create_array(inner, shape=arr.shape, dtype=arr.dtype, chunks=(1, *arr.shape[1:]))
        group[inner][:] = arr
    group[raw_at].attrs["resolution"] = [40, 4, 4]


def volumes(
    suffix: str, damage: Callable[[Path], None] | None = None, *flags: str
) -> Callable[[Path], list[str]]:
    """A segmentation set of three 4 x 32 x 32 volumes (`format: hdf5` for .h5, `zarr`
    for .zarr), raw and labels inside each file; `damage` then edits v1."""

    def setup(root: Path) -> list[str]:
        (root / "data").mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(3):
            labels = (rng.random((4, 32, 32)) > 0.7).astype(np.uint8)
            raw = (rng.integers(0, 100, labels.shape) + 100 * labels).astype(np.uint8)
            write_volume(root / "data" / f"v{i}{suffix}", raw, labels)
        if damage is not None:
            damage(root / "data" / f"v1{suffix}")
        rows = [f"v{i}{suffix},{SPLITS[i]}" for i in range(3)]
        (root / "data" / "index.csv").write_text("image,split\n" + "\n".join(rows) + "\n")
        fmt = "hdf5" if suffix == ".h5" else "zarr"
        (root / "m.yaml").write_text(PIXELS + "datasets:\n" + VOLUME_SET % fmt)
        return ["extract", "--manifest", "m.yaml", "--workers", "0", *flags]

    return setup


CT_PET = (
    "  - {name: pc, format: nifti, path: data, index: index.csv, task: classification, "
    "dims: 3, channels: {mode: rgb, inputs: [{source: ct, intensity: {mode: window, center: "
    "40, width: 400}}, {source: pet, intensity: {mode: window, center: 5, width: 10}}, "
    "{source: ct, intensity: {mode: minmax}}]}}\n"
)
SEQUENCES = (
    "  - {name: seq, format: nifti, path: data, index: index.csv, task: classification, "
    "dims: 3, channels: {mode: per-channel, inputs: [{source: 0}, {source: 1}, {source: 3}]}}\n"
)


def _nii(path: Path, arr: np.ndarray, affine: np.ndarray | None = None) -> None:
    import nibabel as nib

    nib.save(
        nib.Nifti1Image(arr, np.diag([2.0, 2.0, 3.0, 1.0]) if affine is None else affine), path
    )


def petct(damage: Callable[[Path], None] | None = None) -> Callable[[Path], list[str]]:
    """Three CT/PET pairs as index columns `ct`, `pet` (`channels:`); `damage` then edits
    the data folder."""

    def setup(root: Path) -> list[str]:
        data = root / "data"
        data.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(3):
            _nii(data / f"s{i}_ct.nii", rng.integers(-100, 300, (16, 16, 3)).astype(np.int16))
            _nii(data / f"s{i}_pet.nii", rng.lognormal(size=(16, 16, 3)).astype(np.float32))
        rows = [f"s{i}_ct.nii,s{i}_pet.nii,{i % 2},{SPLITS[i]}" for i in range(3)]
        (data / "index.csv").write_text("ct,pet,label,split\n" + "\n".join(rows) + "\n")
        if damage is not None:
            damage(data)
        (root / "m.yaml").write_text(PIXELS + "datasets:\n" + CT_PET)
        return ["extract", "--manifest", "m.yaml", "--workers", "0"]

    return setup


def four_d(shape: tuple[int, ...]) -> Callable[[Path], list[str]]:
    """One 4D NIfTI of `shape` whose sequences 0, 1 and 3 are asked for."""

    def setup(root: Path) -> list[str]:
        (root / "data").mkdir(parents=True)
        _nii(root / "data" / "b.nii", np.random.default_rng(0).random(shape, np.float32))
        (root / "data" / "index.csv").write_text("image,label,split\nb.nii,0,train\n")
        (root / "m.yaml").write_text(PIXELS + "datasets:\n" + SEQUENCES)
        return ["extract", "--manifest", "m.yaml", "--workers", "0"]

    return setup


def _shifted_pet(data: Path) -> None:
    moved = np.diag([2.0, 2.0, 3.0, 1.0])
    moved[0, 3] = 5.0
    _nii(data / "s1_pet.nii", np.ones((16, 16, 3), np.float32), moved)


def _rewrite(raw: np.ndarray, labels: np.ndarray, **kw: str) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        write_volume(path, raw, labels, **kw)

    return damage


def _png_named(path: Path) -> None:
    path.unlink()
    png(path.with_suffix(".png"))
    path.with_suffix(".png").rename(path)


def _cut_chunk(path: Path) -> None:
    chunk = path / "volumes" / "raw" / "c" / "2" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:5])


def _as_n5(path: Path) -> None:
    """An N5 container (root attributes.json, no Zarr metadata) where v1.zarr was."""
    shutil.rmtree(path)
    path.mkdir()
    (path / "attributes.json").write_text('{"n5": "2.0.0"}')


_VOL = np.zeros((4, 32, 32), np.uint8)


def _tif(data: np.ndarray, **kw: object) -> Callable[[Path], None]:
    import tifffile

    return lambda path: tifffile.imwrite(path, data, **kw)  # type: ignore[arg-type]


_RNG = np.random.default_rng(32)
_RGB = _RNG.integers(0, 255, (32, 32, 3), np.uint8)


def outside_link(root: Path) -> list[str]:
    """An images dataset whose i5.png is a symlink to a file outside its folder."""
    (root / "elsewhere").mkdir(parents=True)
    png(root / "elsewhere" / "secret.png", 99)
    args = images(root, [f"i{i}.png,{i % 2},{SPLITS[i % 3]}" for i in range(5)] + ["i5.png,1,test"])
    (root / "data" / "i5.png").unlink()
    (root / "data" / "i5.png").symlink_to(root / "elsewhere" / "secret.png")
    return args


@dataclass(frozen=True)
class Case:
    name: str
    expected: str  # refused | accepted | skipped
    setup: Callable[[Path], list[str]]
    pattern: str = ""  # what a clear refusal names (regex on the output)


RESULTS_HEAD = "dataset,encoder,random_init,resolution,probe,metric,value,train_fraction\n"


def results_csv(line: str, command: str = "probe") -> Callable[[Path], list[str]]:
    """An images dataset and a results folder `out` whose results.csv holds `line`
    (an older featstore's columns, no `task`); then `command` on it."""

    def setup(root: Path) -> list[str]:
        images(root)
        (root / "out").mkdir()
        (root / "out" / "results.csv").write_text(RESULTS_HEAD + line + "\n")
        if command == "report":  # the last probe's manifest names another dataset
            manifest = {"manifest": {"datasets": [{"name": "d", "format": "images",
                        "path": "data", "index": "index.csv", "task": "classification",
                        "dims": 2}]}}  # fmt: skip
            (root / "out" / "run-config.json").write_text(json.dumps(manifest))
            return ["report", "--out", "out"]
        return ["probe", "--manifest", "m.yaml", "--out", "out"]

    return setup


def damaged_model(damage: Callable[[Path], None], flag: str = "") -> Callable[[Path], list[str]]:
    """An images dataset encoded by a copy of the tiny DINOv3 that `damage` edits."""

    def setup(root: Path) -> list[str]:
        model = shutil.copytree(tiny_dinov3(root.parent / "model"), root / "model")
        damage(model)
        return images(root, top=PIXELS.replace("'pixels:8'", repr(f"{model}{flag}")))

    return setup


def _as_html_bin(model: Path) -> None:
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_text("<html><body>404 Not Found</body></html>\n")


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _add(args: list[str], *extra: str) -> Callable[[Path], list[str]]:
    return lambda root: images(root) + list(extra)


SYNTH_BAD = PIXELS + "datasets:\n" + IMAGES % ("classification", "%s")
CASES = [
    # manifests
    Case("valid images dataset (control)", "accepted", images),
    Case(
        "YAML anchors reused modestly (control)",
        "accepted",
        lambda r: manifest(
            r,
            PIXELS.replace("[32]", "&s [32]")
            + "datasets:\n"
            + IMAGES % ("classification", ", resolutions: *s"),
        ),
    ),
    Case(
        "YAML alias bomb (billion laughs)",
        "refused",
        lambda r: manifest(r, billion_laughs()),
        r"m\.yaml: more than 100000 values",
    ),
    Case(
        "YAML alias inside its own anchor",
        "refused",
        lambda r: manifest(r, "a: &a [*a]\ndatasets: *a\n"),
        r"m\.yaml: .*refers to itself",
    ),
    Case(
        "binary garbage as manifest",
        "refused",
        lambda r: manifest(r, os.urandom(4096)),
        r"m\.yaml: not a text file",
    ),
    Case(
        "manifest nested 5000 deep",
        "refused",
        lambda r: manifest(r, "x: " + "[" * 5000),
        r"m\.yaml: not valid YAML: nested deeper",
    ),
    Case(
        "manifest of 2 MB",
        "refused",
        lambda r: manifest(r, "# pad\n" * 400_000),
        r"m\.yaml: larger than 1 MiB",
    ),
    Case(
        "YAML tag !!timestamp on junk",
        "refused",
        lambda r: manifest(r, "datasets: !!timestamp 2001-01-01 -\n"),
        r"m\.yaml: not valid YAML: cannot read",
    ),
    Case(
        "YAML tag !!python/object",
        "refused",
        lambda r: manifest(r, "datasets: !!python/object:os.system x\n"),
        r"m\.yaml: not valid YAML",
    ),
    Case(
        "dataset resolution -224",
        "refused",
        lambda r: manifest(r, SYNTH_BAD % ", resolutions: [-224]"),
        r"dataset 'd', field 'resolutions'",
    ),
    Case(
        "dataset resolution 1000000",
        "refused",
        lambda r: manifest(r, SYNTH_BAD % ", resolutions: [1000000]"),
        r"dataset 'd', field 'resolutions'",
    ),
    Case(
        "top-level resolution 1000000",
        "refused",
        lambda r: manifest(
            r,
            (PIXELS + "datasets:\n" + IMAGES % ("classification", "")).replace("[32]", "[1000000]"),
        ),
        r"field 'resolutions'",
    ),
    Case(
        "split ratios [.nan, .nan, .nan]",
        "refused",
        lambda r: manifest(r, SYNTH_BAD % ", splits: {ratios: [.nan, .nan, .nan]}"),
        r"field 'splits.ratios",
    ),
    Case(
        "metadata coordinate named 'split'",
        "refused",
        lambda r: manifest(r, SYNTH_BAD % ", metadata: {label: split}"),
        r"metadata coordinate names \['split'\]",
    ),
    Case(
        "mask_map {300: 1}",
        "refused",
        lambda r: manifest(r, SYNTH_BAD % ", mask_map: {300: 1}"),
        r"dataset 'd'.*mask_map",
    ),
    Case(
        "glob mask template '{nam}'",
        "refused",
        lambda r: manifest(
            r,
            (SYNTH_BAD % ", index: {glob: '*.png', mask: '{nam}'}").replace(
                "index: index.csv, ", ""
            ),
        ),
        r"dataset 'd', field 'index'",
    ),
    # command-line options
    Case(
        "extract --batch-size -4",
        "refused",
        _add([], "--batch-size", "-4"),
        r"error: --batch-size -4",
    ),
    Case(
        "extract --batch-size 0", "refused", _add([], "--batch-size", "0"), r"error: --batch-size 0"
    ),
    Case("extract --workers -1", "refused", _add([], "--workers", "-1"), r"error: --workers -1"),
    Case(
        "extract --resolution 1000000",
        "refused",
        _add([], "--resolution", "1000000"),
        r"error: --resolution \[1000000\]",
    ),
    Case(
        "probe --pool median",
        "refused",
        lambda r: (
            [
                *manifest(r, PIXELS + "datasets:\n" + IMAGES % ("classification", ""), "probe"),
                "--pool",
                "median",
            ]
        ),
        r"error: --pool 'median'",
    ),
    # results folders (issue 32)
    Case(
        "results.csv with resolution 'abc', probe",
        "refused",
        results_csv("d,pixels:8,False,abc,linear,auroc,0.5,1"),
        r"results\.csv, line 2, column 'resolution': 'abc' is not a whole number",
    ),
    Case(
        "results.csv with train_fraction 'half', probe",
        "refused",
        results_csv("d,pixels:8,False,32,linear,auroc,0.5,half"),
        r"results\.csv, line 2, column 'train_fraction': 'half' is not a number",
    ),
    Case(
        "results.csv with random_init 'maybe', probe",
        "refused",
        results_csv("d,pixels:8,maybe,32,linear,auroc,0.5,1"),
        r"results\.csv, line 2, column 'random_init'",
    ),
    Case(
        "report of rows no task or manifest places",
        "refused",
        results_csv("gone,pixels:8,False,32,linear,auroc,0.5,1", "report"),
        r"the rows of gone give no task",
    ),
    # images and index files
    Case(
        "PNG header 30000x30000",
        "refused",
        with_file(lambda d: png_header(d / "i4.png", 30000, 30000)),
        r"i4\.png: its header claims",
    ),
    Case(
        "PNG header 30000x30000, --skip-bad",
        "skipped",
        lambda r: [*with_file(lambda d: png_header(d / "i4.png", 30000, 30000))(r), "--skip-bad"],
    ),
    Case(
        "PNG header 30000x30000, --skip-bad, tiny DINOv3",
        "skipped",
        lambda r: (
            [
                *with_file(
                    lambda d: png_header(d / "i4.png", 30000, 30000),
                    top=PIXELS.replace("'pixels:8'", repr(str(tiny_dinov3(r.parent / "model")))),
                )(r),
                "--skip-bad",
            ]
        ),
    ),
    Case(
        "truncated PNG, --skip-bad",
        "skipped",
        lambda r: (
            [
                *with_file(lambda d: (d / "i2.png").write_bytes((d / "i2.png").read_bytes()[:40]))(
                    r
                ),
                "--skip-bad",
            ]
        ),
    ),
    Case(
        "split typo 'tset', splits: {from: column}",
        "refused",
        lambda r: images(r, ["a.png,0,train", "b.png,1,tset"], extra=", splits: {from: column}"),
        r"index\.csv, line 3: split 'tset'",
    ),
    Case(
        "no split column, splits: {from: column}",
        "refused",
        lambda r: images(
            r, ["a.png,0", "b.png,1"], "image,label", extra=", splits: {from: column}"
        ),
        r"index\.csv: index lacks column\(s\) \['split'\]",
    ),
    Case(
        "label 1.7",
        "refused",
        lambda r: images(r, ["a.png,0,train", "b.png,1.7,test"]),
        r"index\.csv, line 3: label '1\.7'",
    ),
    Case(
        "label -1",
        "refused",
        lambda r: images(r, ["a.png,0,train", "b.png,-1,test"]),
        r"index\.csv, line 3: label -1",
    ),
    Case(
        "label 2 with 2 classes",
        "refused",
        lambda r: images(r, ["a.png,0,train", "b.png,2,test"], extra=", classes: [a, b]"),
        r"index\.csv, line 3: label 2 is out of range",
    ),
    Case(
        "multilabel rows of 3 and 2 values",
        "refused",
        lambda r: images(r, ["a.png,0;1;0,train", "b.png,1;0,test"], task="multilabel"),
        r"index\.csv, line 3: multilabel has 2",
    ),
    Case(
        "mask value 5 outside classes",
        "refused",
        seg_with_stray_mask_value,
        r"m3\.png: mask values \[5\]",
    ),
    Case(
        "index CSV of binary garbage",
        "refused",
        with_file(lambda d: (d / "index.csv").write_bytes(os.urandom(2000))),
        r"index\.csv: not a UTF-8",
    ),
    Case(
        "index row with an extra cell",
        "refused",
        lambda r: images(r, ["a.png,0,train,x"]),
        r"index\.csv, line 2: 4 cells",
    ),
    Case(
        "index row ../../etc/hostname",
        "refused",
        outside_row("../../etc/hostname"),
        r"index\.csv, line 8: image '\.\./\.\./etc/hostname' resolves to .*allow_outside_paths",
    ),
    Case(
        "index row /etc/hostname (absolute)",
        "refused",
        outside_row("/etc/hostname"),
        r"index\.csv, line 8: image '/etc/hostname' is an absolute path.*allow_outside_paths",
    ),
    Case(
        "index row: a symlink out of the dataset",
        "refused",
        outside_link,
        r"index\.csv, line 7: image 'i5\.png' resolves to .*secret\.png, outside",
    ),
    Case(
        "slide with a 72 dpi tag, no mpp column",
        "refused",
        lambda r: slides(r, ["a.tif,0,train,", "b.tif,1,test,"], dpi=72),
        r"a\.tif: the slide records no pixel size \(its TIFF resolution tags say 72",
    ),
    Case(
        "slide with a 72 dpi tag and an mpp column",
        "accepted",
        lambda r: slides(r, ["a.tif,0,train,0.5", "b.tif,1,test,0.5"], dpi=72),
    ),
    Case(
        "absurd plan: slide mpp 20 in the index, upsample",
        "refused",
        lambda r: slides(
            r,
            ["a.tif,0,train,20", "b.tif,1,test,20"],
            "tile_mpp: 0.5, tile_size: 64, upsample: true",
        ),
        r"a\.tif: the plan lays tiles every 2 level-0 px",
    ),
    Case(
        "absurd plan: a slide tile of 0.03 level-0 px",
        "refused",
        lambda r: slides(
            r,
            ["a.tif,0,train,", "b.tif,1,test,"],
            "tile_mpp: 0.0002, tile_size: 64, upsample: true",
        ),
        r"a\.tif: a tile of 64 px at 0\.0002 um covers 0\.0256 level-0 pixels",
    ),
    Case(
        "blank slide among slides (no tissue)",
        "skipped",
        lambda r: slides(r, ["a.tif,0,train,", "blank.tif,1,train,", "b.tif,1,test,"]),
    ),
    Case(
        "NIfTI header 3000^3 voxels",
        "refused",
        nifti_bomb,
        r"v\.nii: its header says 3000 x 3000 x 3000",
    ),
    # encoders (issue 32)
    Case(
        "encoder model.safetensors truncated",
        "refused",
        damaged_model(lambda m: _truncate(m / "model.safetensors")),
        r"model/model\.safetensors: not a readable weights file",
    ),
    Case(
        "encoder pytorch_model.bin is an HTML page",
        "refused",
        damaged_model(_as_html_bin),
        r"model/pytorch_model\.bin: not a readable weights file",
    ),
    Case(
        "encoder folder with ':random' (not ignored)",
        "refused",
        damaged_model(lambda m: None, ":random"),
        r"drop ':random'",
    ),
    Case(
        "DICOM without pixel data",
        "refused",
        dicom_without_pixels,
        r"a\.dcm: cannot decode its pixel data",
    ),
    # TIFF pixel layouts (issue 32): decoded by a stated rule, or refused naming it
    Case(
        "CMYK TIFF image",
        "refused",
        tiff_image(_tif(_RNG.integers(0, 255, (32, 32, 4), np.uint8), photometric="separated")),
        r"i4\.tif: photometric SEPARATED \(CMYK",
    ),
    Case(
        "5-channel TIFF image (no grey or RGB rule)",
        "refused",
        tiff_image(
            _tif(
                _RNG.integers(0, 255, (32, 32, 5), np.uint8),
                photometric="minisblack",
                planarconfig="contig",
            )
        ),
        r"i4\.tif: 5 samples per pixel",
    ),
    Case(
        "3-page TIFF as one image",
        "refused",
        tiff_image(_tif(_RNG.integers(0, 255, (3, 32, 32), np.uint8), photometric="minisblack")),
        r"i4\.tif: 3 full-resolution pages",
    ),
    Case(
        "float min-is-white TIFF image",
        "refused",
        tiff_image(_tif(_RNG.random((32, 32)).astype(np.float32), photometric="miniswhite")),
        r"i4\.tif: photometric MINISWHITE",
    ),
    Case(
        "32-bit float TIFF image (read as stored)",
        "accepted",
        tiff_image(_tif(_RNG.normal(0, 1e3, (32, 32)).astype(np.float32))),
    ),
    Case(
        "palette TIFF image (expanded)",
        "accepted",
        tiff_image(
            _tif(
                _RGB[..., 0],
                photometric="palette",
                colormap=(_RNG.integers(0, 255, (3, 256)) * 257).astype(np.uint16),
            )
        ),
    ),
    Case(
        "planar RGB TIFF stack (reordered, not rows)",
        "accepted",
        tiff_stack(
            _tif(
                np.stack([np.moveaxis(_RGB, -1, 0)] * 3), photometric="rgb", planarconfig="separate"
            )
        ),
    ),
    Case(
        "CMYK TIFF stack",
        "refused",
        tiff_stack(_tif(_RNG.integers(0, 255, (3, 32, 32, 4), np.uint8), photometric="separated")),
        r"v1\.tif: photometric SEPARATED \(CMYK",
    ),
    # HDF5 and Zarr volumes (issue 30)
    Case("HDF5 volumes, raw and labels by path (control)", "accepted", volumes(".h5")),
    Case("Zarr v3 volumes, raw and labels by path (control)", "accepted", volumes(".zarr")),
    Case(
        "HDF5 volume truncated",
        "refused",
        volumes(".h5", _truncate),
        r"v1\.h5 \[volumes/raw\]: not a readable HDF5 file",
    ),
    Case(
        "PNG renamed .h5",
        "refused",
        volumes(".h5", _png_named),
        r"v1\.h5 \[volumes/raw\]: not a readable HDF5 file",
    ),
    Case(
        "HDF5 volume without the raw path",
        "refused",
        volumes(".h5", _rewrite(_VOL, _VOL, raw_at="raw")),
        r"v1\.h5 \[volumes/raw\]: no such dataset",
    ),
    Case(
        "HDF5 raw of rank 4",
        "refused",
        volumes(".h5", _rewrite(_VOL[None], _VOL)),
        r"v1\.h5 \[volumes/raw\]: array of rank 4",
    ),
    Case(
        "HDF5 labels of another shape",
        "refused",
        volumes(".h5", _rewrite(_VOL, _VOL[:, :16])),
        r"v1\.h5 \[volumes/labels\]: label array of shape \(4, 16, 32\)",
    ),
    Case(
        "HDF5 neuron ids (uint64) as class ids",
        "refused",
        volumes(".h5", _rewrite(_VOL, _VOL.astype(np.uint64) + 70000)),
        r"v1\.h5 \[volumes/labels\]: mask values must be integer class ids",
    ),
    Case(
        "Zarr volume with a truncated chunk",
        "refused",
        volumes(".zarr", _cut_chunk),
        r"v1\.zarr \[volumes/raw\]: cannot read slices",
    ),
    Case(
        "Zarr volume with a truncated chunk, --skip-bad",
        "skipped",
        volumes(".zarr", _cut_chunk, "--skip-bad"),
    ),
    Case(
        "a folder of PNGs named .zarr",
        "refused",
        volumes(".zarr", lambda p: (shutil.rmtree(p), png(p / "0.png"))),
        r"v1\.zarr \[volumes/raw\]: not a readable Zarr group",
    ),
    Case(
        "N5 container as zarr",
        "refused",
        volumes(".zarr", _as_n5),
        r"v1\.zarr \[volumes/raw\]: an N5 container; N5 is not supported",
    ),
    # Multi-channel NIfTI: CT/PET index columns, 4D sequences (issue 30)
    Case("PET/CT channels as index columns (control)", "accepted", petct()),
    Case(
        "PET/CT channels, PET truncated",
        "refused",
        petct(lambda d: _truncate(d / "s1_pet.nii")),
        r"s1_pet\.nii: cannot read NIfTI",
    ),
    Case(
        "PET/CT channels, PET on another grid",
        "refused",
        petct(lambda d: _nii(d / "s1_pet.nii", np.ones((16, 12, 3), np.float32))),
        r"s1_pet\.nii: grid \(16, 12, 3\) differs from .*s1_ct\.nii \(16, 16, 3\)",
    ),
    Case(
        "PET/CT channels, PET affine shifted 5 mm",
        "refused",
        petct(_shifted_pet),
        r"s1_pet\.nii: affine .* differs from .*s1_ct\.nii .* by up to 5 mm",
    ),
    Case(
        "PET/CT channels, NaN in PET",
        "refused",
        petct(lambda d: _nii(d / "s1_pet.nii", np.full((16, 16, 3), np.nan, np.float32))),
        r"s1_pet\.nii: \d+ NaN/Inf values",
    ),
    Case(
        "PET/CT channels, no pet column",
        "refused",
        petct(lambda d: (d / "index.csv").write_text("ct,label,split\ns0_ct.nii,0,train\n")),
        r"index\.csv: index lacks column\(s\) \['pet'\]",
    ),
    Case("4D NIfTI sequences last (control)", "accepted", four_d((16, 16, 12, 4))),
    Case("4D NIfTI sequences first (control)", "accepted", four_d((4, 16, 16, 12))),
    Case(
        "4D NIfTI missing a sequence",
        "refused",
        four_d((16, 16, 12, 3)),
        r"b\.nii: the 4D volume holds 3 sequence\(s\) along its last axis",
    ),
    Case(
        "4D NIfTI with an ambiguous sequence axis",
        "refused",
        four_d((4, 16, 16, 4)),
        r"b\.nii: a 4D volume of shape \(4, 16, 16, 4\) whose sequence axis is ambiguous",
    ),
    Case(
        "4D NIfTI sources on a 3D file",
        "refused",
        four_d((16, 16, 12)),
        r"b\.nii: shape \(16, 16, 12\) is not a 4D volume",
    ),
]


def run_case(case: Case, root: Path, env: dict[str, str]) -> tuple[str, float, str]:
    """(outcome, seconds, first line of the error or summary)."""
    args = case.setup(root)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            [FEATSTORE, *args], cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT
        )
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - start, f"no answer in {TIMEOUT} s"
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    lines = [x for x in out.splitlines() if x.strip()]
    if "Traceback (most recent call last)" in out:
        return "traceback", seconds, lines[-1] if lines else ""
    error = proc.stderr[proc.stderr.find("error: ") :] if "error: " in proc.stderr else ""
    if proc.returncode == 2 and error:
        clear = re.search(case.pattern, out) is not None
        message = " | ".join(x.strip() for x in error.splitlines()).removeprefix("error: ")
        return ("refused" if clear else "unclear"), seconds, message.replace(str(root) + "/", "")
    if proc.returncode == 0:
        skipped = re.search(r"(\d+) samples? skipped", out)
        n = int(skipped.group(1)) if skipped else 0
        done = [x for x in lines if x.startswith("done:")]
        return ("skipped" if n else "accepted"), seconds, (done or lines or [""])[-1]
    return f"exit {proc.returncode}", seconds, lines[-1] if lines else ""


# ------------------------------------------------------------------ corruption

ARRAYS = ["cls", "patch", "mask", "sample", "slice", "split"]


def _chunk(path: Path, name: str, unit: int) -> Path:
    chunk = path / name / "c" / str(unit)
    return chunk if chunk.is_file() else next(p for p in sorted(chunk.rglob("*")) if p.is_file())


def _damage(file: Path, how: str) -> None:
    data = file.read_bytes()
    if how == "flip":
        file.write_bytes(data[:-9] + bytes([data[-9] ^ 0x10]) + data[-8:])
    elif how == "truncate":
        file.write_bytes(data[: len(data) // 2])
    else:
        file.unlink()


def _edit_attrs(path: Path, edit: Callable[[dict], None]) -> None:
    import zarr

    root = zarr.open_group(path, mode="r+", use_consolidated=False)
    attrs = dict(root.attrs)
    edit(attrs)
    root.attrs.put(attrs)


def _bad_json(path: Path) -> None:
    (path / "zarr.json").write_text("{ not json")


EDITS: dict[str, Callable[[Path], None]] = {
    "attributes: preprocess.resolution": lambda p: _edit_attrs(
        p, lambda a: a["preprocess"].update(resolution=64)
    ),
    "attributes: identity recipe": lambda p: _edit_attrs(
        p, lambda a: a["identity"]["recipe"].update(resolution=64)
    ),
    "attributes: skipped list": lambda p: _edit_attrs(
        p, lambda a: a.update(skipped={"img0000": "edited"})
    ),
    "attributes: encoder random_init": lambda p: _edit_attrs(
        p, lambda a: a["encoder"].update(random_init=True)
    ),
    "zarr.json: invalid JSON": _bad_json,
    # marks are data: a complete set's lost mark, and the marks group's own metadata
    "marks: unit 1's mark deleted": lambda p: (p / "_featstore" / "done" / "c" / "1").unlink(),
    "zarr.json of _featstore deleted": lambda p: (p / "_featstore" / "zarr.json").unlink(),
}


def reference_set(work: Path, model: Path, env: dict[str, str]) -> Path:
    """A complete 2D segmentation set of 3 units (12 items, 4 per unit), tiny DINOv3."""
    entry = (
        "  - {name: d, format: synthetic, synthetic: {kind: seg2d, n: 12, size: 32, seed: 0},"
        " path: data/d, task: segmentation, dims: 2}\n"
    )
    (work / "m.yaml").write_text(
        f"cache: cache\nencoders: ['{model}']\nresolutions: [32]\nbaseline: null\n"
        f"batch_size: 4\nunit_items: 4\ndatasets:\n{entry}"
    )
    cmd = [FEATSTORE, "extract", "--manifest", "m.yaml", "--workers", "0"]
    subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    (path,) = (work / "cache").glob("*.zarr")
    return path


def corruption_cases(ref: Path, work: Path, env: dict[str, str]) -> list[tuple[str, str, bool]]:
    """(case, what verify said, detected) for a clean copy and every damage."""
    damages: list[tuple[str, Callable[[Path], None], str]] = [
        (f"{name} unit 1: {how}", lambda p, n=name, h=how: _damage(_chunk(p, n, 1), h), name)
        for name in ARRAYS
        for how in ("flip", "truncate", "delete")
    ]
    damages += [(label, edit, "") for label, edit in EDITS.items()]
    out = []
    for i, (label, damage, name) in enumerate([("clean copy (control)", None, ""), *damages]):
        copy = work / f"copy{i}" / ref.name
        shutil.copytree(ref, copy)
        if damage is not None:
            damage(copy)
        proc = subprocess.run(
            [FEATSTORE, "verify", str(copy)], env=env, capture_output=True, text=True
        )
        fails = [x for x in proc.stdout.splitlines() if x.startswith("FAIL")]
        if damage is None:
            detected = proc.returncode == 0 and not fails
            said = "ok" if detected else (fails or ["?"])[0]
        else:
            wanted = f"FAIL {name} unit 1" if name else "FAIL "
            detected = proc.returncode == 1 and any(x.startswith(wanted) for x in fails)
            said = fails[0] if fails else f"exit {proc.returncode}, no FAIL line"
        if "Traceback" in proc.stdout + proc.stderr:
            detected, said = False, "traceback"
        out.append((label, said, detected))
    return out


# ------------------------------------------------------------------ report


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def main(only: list[str]) -> int:
    """Every part; with `only` (substrings of case names), those hostile inputs alone."""
    start = time.perf_counter()
    cases = [c for c in CASES if not only or any(o in c.name for o in only)]
    with tempfile.TemporaryDirectory(prefix="featstore-reliability-") as tmp:
        tmp_path = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k != "FEATSTORE_CACHE"}
        env |= {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf")}
        print(f"{'input':50} {'expected':9} {'outcome':10} {'s':>5}  message")
        tally: dict[str, int] = {}
        misses = 0
        for i, case in enumerate(cases):
            root = tmp_path / f"case{i:02d}"
            root.mkdir()
            outcome, seconds, message = run_case(case, root, env)
            tally[outcome] = tally.get(outcome, 0) + 1
            ok = outcome == case.expected
            misses += not ok
            mark = "" if ok else "  <-- expected " + case.expected
            print(
                f"{_cut(case.name, 50):50} {case.expected:9} {outcome:10} {seconds:5.1f}  "
                f"{_cut(message.removeprefix('error: '), 90)}{mark}"
            )
        n = len(cases)
        print(
            f"\nhostile inputs: {n} cases, {n - misses} as expected; "
            + ", ".join(f"{k} {v}" for k, v in sorted(tally.items()))
        )
        if only:
            print(f"total {time.perf_counter() - start:.0f} s; {misses} misses (--only)")
            return 1 if misses else 0

        work = tmp_path / "corruption"
        work.mkdir()
        ref = reference_set(work, tiny_dinov3(tmp_path / "model"), env)
        rows = corruption_cases(ref, work, env)
        print(f"\n{'corruption (featstore verify)':40} {'detected':8}  first FAIL line")
        for label, said, detected in rows:
            print(f"{label:40} {'yes' if detected else 'NO':8}  {_cut(said, 100)}")
        damaged = rows[1:]
        found = sum(d for _, _, d in damaged)
        chunk_found = sum(d for label, _, d in damaged if " unit 1: " in label)
        print(
            f"\ncorruptions detected: {found}/{len(damaged)} "
            f"(chunks {chunk_found}/{len(ARRAYS) * 3}, attributes and metadata "
            f"{found - chunk_found}/{len(EDITS)}); clean copy passes: "
            f"{'yes' if rows[0][2] else 'NO'}"
        )
        misses += len(damaged) - found + (not rows[0][2])

        import edges as e  # benchmarks/edges.py

        edges = [
            *e.signal_cases(FEATSTORE, work, env),
            *e.kill_cases(FEATSTORE, work, env),
            *e.read_only_cases(FEATSTORE, work, env),
            *e.version_cases(FEATSTORE, work, env),
            *e.cluster_option_cases(FEATSTORE, work, env),
        ]
        print(f"\n{'edges (signals, kills, read-only, versions, cluster)':50} {'ok':3}  last line")
        for label, ok, said in edges:
            print(f"{label:50} {'yes' if ok else 'NO':3}  {_cut(said, 100)}")
        print(f"\nedges: {sum(ok for _, ok, _ in edges)}/{len(edges)} as expected")
        misses += sum(not ok for _, ok, _ in edges)
    print(f"total {time.perf_counter() - start:.0f} s; {misses} misses")
    return 1 if misses else 0


if __name__ == "__main__":
    # --only slide,index: the hostile inputs whose names contain one of these, alone
    chosen = sys.argv[2].split(",") if sys.argv[1:2] == ["--only"] and sys.argv[2:] else []
    sys.exit(main(chosen))
