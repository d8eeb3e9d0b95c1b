"""The reader contract, over every reader in `READERS` (issue 32).

1. Every pixel layout a TIFF can hold, written here with tifffile, is decoded by each
   TIFF reader (images, stack, wsi) to what an independent decode in this file gives
   (the written array with the documented rule of featstore.data.layouts applied
   here, or PIL), or refused with a `BadInputError` naming the file and the property.
   Test ids name the matrix: reader-dtype-photometric-planar-tiling-pages.
2. For every reader, the header's size equals the decoded shape.
3. For tiled readers (wsi; hdf5 and zarr volumes, read slice run by slice run), a
   region read equals the same region of a whole read by the file's own library
   (tifffile, h5py, zarr).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import pydicom
import pytest
import tifffile
import zarr
from PIL import Image
from pydicom.data import get_testdata_file

from featstore.data import readers
from featstore.data.manifest import Dataset
from featstore.data.samples import Sample, Tiles
from featstore.errors import BadInputError

pytest.importorskip("tiffslide")

ROWS, COLS, TILE, PAGES = 40, 48, 16, 3
TIFF_READERS = ("images", "stack", "wsi")
WHITE = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}


@dataclass(frozen=True)
class Layout:
    """One layout: how to write it, and what it decodes to by the documented rule.

    truth: (written array (H, W, S) or (H, W), colormap) -> (H, W, C) expected;
    refused: reader -> the property the refusal must name ("" = decoded).
    """

    name: str
    dtype: Any
    photometric: str
    samples: int
    truth: Callable[[np.ndarray, np.ndarray | None], np.ndarray]
    write: dict[str, Any] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    palette16: bool = False
    tolerance: int = 0  # JPEG: imagecodecs and PIL's libjpeg may round differently


def _as_is(a: np.ndarray, _: np.ndarray | None) -> np.ndarray:
    return a if a.ndim == 3 else a[..., None]


def _inverted(a: np.ndarray, _: np.ndarray | None) -> np.ndarray:
    return (np.iinfo(a.dtype).max - a)[..., None]


def _on_white(premultiplied: bool) -> Callable[[np.ndarray, np.ndarray | None], np.ndarray]:
    def truth(a: np.ndarray, _: np.ndarray | None) -> np.ndarray:
        top = float(np.iinfo(a.dtype).max)
        alpha = a[..., -1:] / top
        colour = a[..., :-1].astype(np.float64)
        out = colour + top * (1 - alpha) if premultiplied else colour * alpha + top * (1 - alpha)
        return np.clip(np.rint(out), 0, top).astype(a.dtype)

    return truth


def _palette(a: np.ndarray, cmap: np.ndarray | None) -> np.ndarray:
    assert cmap is not None
    rgb = np.stack([cmap[c][a] for c in range(3)], -1)
    return (rgb // 257).astype(np.uint8) if not (cmap % 257).any() else rgb


def _pil_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _jfif(a: np.ndarray, _: np.ndarray | None) -> np.ndarray:
    """Full-range YCbCr -> RGB (JFIF; ITU-R BT.601), as layouts.py documents it."""
    y, cb, cr = a[..., 0] / 1.0, a[..., 1] - 128.0, a[..., 2] - 128.0
    rgb = [y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb]
    return np.clip(np.rint(np.stack(rgb, -1)), 0, 255).astype(np.uint8)


WSI_8BIT = "8-bit RGB"
LAYOUTS = [
    Layout("uint8-minisblack", np.uint8, "minisblack", 1, _as_is),
    Layout("uint16-minisblack", np.uint16, "minisblack", 1, _as_is, refused={"wsi": WSI_8BIT}),
    Layout("uint32-minisblack", np.uint32, "minisblack", 1, _as_is, refused={"wsi": WSI_8BIT}),
    Layout("int32-minisblack", np.int32, "minisblack", 1, _as_is, refused={"wsi": WSI_8BIT}),
    Layout("float32-minisblack", np.float32, "minisblack", 1, _as_is, refused={"wsi": WSI_8BIT}),
    Layout("uint8-miniswhite", np.uint8, "miniswhite", 1, _inverted),
    Layout("uint16-miniswhite", np.uint16, "miniswhite", 1, _inverted, refused={"wsi": WSI_8BIT}),
    Layout(
        "float32-miniswhite",
        np.float32,
        "miniswhite",
        1,
        _as_is,
        refused=dict.fromkeys(TIFF_READERS, "MINISWHITE"),
    ),
    Layout("uint8-rgb", np.uint8, "rgb", 3, _as_is),
    Layout("uint16-rgb", np.uint16, "rgb", 3, _as_is, refused={"wsi": WSI_8BIT}),
    Layout(
        "uint8-rgba", np.uint8, "rgb", 4, _on_white(False), write={"extrasamples": ["unassalpha"]}
    ),
    Layout(
        "uint8-rgba-premultiplied",
        np.uint8,
        "rgb",
        4,
        _on_white(True),
        write={"extrasamples": ["assocalpha"]},
    ),
    Layout(
        "uint8-greyalpha",
        np.uint8,
        "minisblack",
        2,
        _on_white(False),
        write={"extrasamples": ["unassalpha"]},
    ),
    Layout("uint8-palette", np.uint8, "palette", 1, _palette),
    Layout(
        "uint8-palette16",
        np.uint8,
        "palette",
        1,
        _palette,
        palette16=True,
        refused={"wsi": "16-bit palette"},
    ),
    Layout("uint8-ycbcr", np.uint8, "ycbcr", 3, _jfif),  # and within 1 of PIL, below
    Layout(
        "uint8-ycbcr-jpeg",
        np.uint8,
        "ycbcr",
        3,
        lambda a, _: a,
        write={"compression": "jpeg"},
        tolerance=2,
    ),
    Layout(
        "uint8-cmyk",
        np.uint8,
        "separated",
        4,
        _as_is,
        refused=dict.fromkeys(TIFF_READERS, "photometric SEPARATED (CMYK"),
    ),
    Layout(
        "uint8-multichannel",
        np.uint8,
        "minisblack",
        5,
        _as_is,
        refused=dict.fromkeys(TIFF_READERS, "5 samples per pixel"),
    ),
]


@dataclass(frozen=True)
class Case:
    reader: str
    layout: Layout
    separate: bool
    tiled: bool
    pages: int

    @property
    def id(self) -> str:
        planar = "separate" if self.separate else "contig"
        tiling = "tiled" if self.tiled else "stripped"
        pages = "multipage" if self.pages > 1 else "single"
        return f"{self.reader}-{self.layout.name}-{planar}-{tiling}-{pages}"

    def refusal(self) -> str:
        """The property a refusal names, or "" where the case is decoded."""
        if self.layout.name in ("uint8-ycbcr",) and self.separate:
            return "subsampling"  # never reached: tifffile writes YCbCr contiguous
        if self.reader == "images" and self.pages > 1:  # checked before the layout
            return f"{self.pages} full-resolution pages"
        if self.layout.refused.get(self.reader):
            return self.layout.refused[self.reader]
        if self.reader == "wsi" and self.separate:
            return "planar configuration separate"
        return ""


def _cases() -> list[Case]:
    out = []
    for reader in TIFF_READERS:
        for lay in LAYOUTS:
            for separate in (False, True):
                if separate and (lay.samples == 1 or "jpeg" in lay.name or "ycbcr" in lay.name):
                    continue  # one sample has no planes; JPEG/YCbCr tifffile writes contiguous
                for tiled in (False, True):
                    for pages in (1, PAGES):
                        if reader == "wsi" and pages > 1:
                            continue  # a slide's pages are its levels (tests/test_slides.py)
                        out.append(Case(reader, lay, separate, tiled, pages))
    return out


CASES = _cases()


def _data(lay: Layout, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W, S) (or (H, W)) random samples over the dtype's range, and a colormap."""
    shape = (ROWS, COLS, lay.samples) if lay.samples > 1 else (ROWS, COLS)
    dtype = np.dtype(lay.dtype)
    if dtype.kind == "f":
        arr = rng.normal(0, 1000, shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        arr = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if lay.photometric == "palette":
        cmap = rng.integers(0, 65536 if lay.palette16 else 256, (3, 256))
        return arr, (cmap if lay.palette16 else cmap * 257).astype(np.uint16)
    return arr, None


def _write(path: Path, case: Case, pages: list[np.ndarray], cmap: np.ndarray | None) -> None:
    lay = case.layout
    kw: dict[str, Any] = {"photometric": lay.photometric, **lay.write}
    if case.tiled:
        kw["tile"] = (TILE, TILE)
    if cmap is not None:
        kw["colormap"] = cmap
    if case.reader == "wsi":
        kw |= {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}  # 0.5 um/px
    with tifffile.TiffWriter(path) as tw:
        for page in pages:
            data = np.moveaxis(page, -1, 0) if case.separate else page
            planar = {"planarconfig": "separate" if case.separate else "contig"}
            planar = planar if lay.samples > 1 else {}
            tw.write(np.ascontiguousarray(data), **kw, **planar)


def _truth(path: Path, case: Case, page: np.ndarray, cmap: np.ndarray | None) -> np.ndarray:
    """(H, W, C) of one written page by the documented rule, computed here."""
    if case.layout.name == "uint8-ycbcr-jpeg":  # lossy: PIL's libjpeg is the reference
        return _pil_rgb(path)
    return case.layout.truth(page, cmap)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601, as stack.py documents it."""
    if rgb.shape[-1] == 1:
        return rgb[..., 0]
    y = 0.299 * rgb[..., 0].astype(np.float64) + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
    return np.rint(y).astype(rgb.dtype) if rgb.dtype.kind in "iu" else y.astype(rgb.dtype)


def _dataset(folder: Path, fmt: str, name: str) -> Dataset:
    if fmt == "stack":
        (folder / "index.csv").write_text(f"image,label,split\n{name},0,train\n")
        return Dataset(
            name="c", format="stack", path=folder, index="index.csv", task="classification",
            dims=3,
        )  # fmt: skip
    if fmt == "wsi":
        (folder / "index.csv").write_text(f"image,label,split,mpp\n{name},0,train,\n")
        return Dataset.model_validate(
            dict(name="c", format="wsi", path=folder, index="index.csv", task="classification",
                 dims=2, tiling={"tile_mpp": 0.5, "tile_size": TILE})
        )  # fmt: skip
    (folder / "index.csv").write_text(f"image,label,split\n{name},0,train\n")
    return Dataset(
        name="c", format=fmt, path=folder, index="index.csv", task="classification", dims=2
    )


# level-0 (x, y) of the tiles a slide case reads: inside, on tile edges and across them
XY = np.array([[0, 0], [16, 8], [32, 24], [5, 11]], np.int64)


def _slide_sample(folder: Path, name: str) -> Sample:
    """A slide's sample with hand-placed tiles (random pixels have no tissue rule)."""
    tiles = Tiles(xy=XY, mpp=0.5, mpp_source="file", level=0, read=TILE)
    return Sample("s", "train", (0,), len(XY), str(folder / name), tiles=tiles)


def _decode(ds: Dataset, folder: Path, name: str) -> tuple[np.ndarray, tuple[int, int]]:
    """(items, H, W, C) as read, and the header's size, through the reader."""
    if ds.format == "wsi":
        s = _slide_sample(folder, name)
        got = readers.load(ds, s, as_read=True, items=range(s.n_items)).image
        return got, readers.header(ds, s).size
    (s,) = readers.list_samples(ds)
    return readers.load(ds, s, as_read=True).image, readers.header(ds, s).size


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_every_tiff_layout_is_decoded_by_its_rule_or_refused(tmp_path, case):
    rng = np.random.default_rng(zlib.crc32(case.layout.name.encode()))
    pages = [_data(case.layout, rng) for _ in range(case.pages)]
    cmap = pages[0][1]
    arrays = [a for a, _ in pages]
    name = "x.tif"
    _write(tmp_path / name, case, arrays, cmap)
    ds = _dataset(tmp_path, case.reader, name)
    wanted = case.refusal()
    if wanted:
        with pytest.raises(BadInputError) as err:
            _decode(ds, tmp_path, name)
        assert name in str(err.value) and wanted in str(err.value), str(err.value)
        return
    got, size = _decode(ds, tmp_path, name)
    if case.layout.name == "uint8-ycbcr-jpeg":  # PIL reads page 0 only
        truths = [_truth(tmp_path / name, case, arrays[0], cmap)]
        got = got[:1] if case.reader == "stack" else got
    else:
        truths = [_truth(tmp_path / name, case, a, cmap) for a in arrays]
    if case.layout.name == "uint8-ycbcr":  # PIL (page 0) agrees, within its truncation
        assert np.abs(_pil_rgb(tmp_path / name).astype(int) - truths[0]).max() <= 1
    tol = case.layout.tolerance
    if case.reader == "images":
        (truth,) = truths
        if truth.shape[-1] == 3 and (truth[..., :1] == truth).all():
            truth = truth[..., :1]  # grey saved as RGB is grey (pictures.py)
        assert got.shape == (1, ROWS, COLS, truth.shape[-1]) and got.dtype == truth.dtype
        np.testing.assert_allclose(got[0].astype(np.float64), truth, atol=tol, rtol=0)
    elif case.reader == "stack":
        expected = np.stack([_luma(t) for t in truths])[..., None]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        # luma is rounded in float64 here and there alike; JPEG adds its own tolerance
        np.testing.assert_allclose(got.astype(np.float64), expected, atol=tol, rtol=0)
    else:
        (truth,) = truths
        rgb = np.repeat(truth, 3, -1) if truth.shape[-1] == 1 else truth
        crops = np.stack([rgb[y : y + TILE, x : x + TILE] for x, y in XY])
        assert got.dtype == np.uint8 and got.shape == crops.shape
        np.testing.assert_allclose(got.astype(np.float64), crops, atol=tol, rtol=0)
    assert size == got.shape[1:3], "the header's size is the decoded shape"


# ---------------------------------------------------------------- every reader


def _write_images(folder: Path) -> Dataset:
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24), np.uint8)).save(
        folder / "a.png"
    )
    return _dataset(folder, "images", "a.png")


def _write_nifti(folder: Path) -> Dataset:
    vol = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), folder / "v.nii.gz")
    (folder / "index.csv").write_text("image,label,split\nv.nii.gz,0,train\n")
    return Dataset(
        name="c", format="nifti", path=folder, index="index.csv", task="classification", dims=3
    )


def _write_dicom(folder: Path) -> Dataset:
    ref = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    (folder / "series").mkdir()
    for i in range(3):
        ds = ref.copy()
        ds.Rows, ds.Columns = 8, 10
        ds.PixelData = np.full((8, 10), i, np.int16).tobytes()
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.save_as(folder / "series" / f"s{i}.dcm")
    (folder / "index.csv").write_text("image,label,split\nseries,0,train\n")
    return Dataset(
        name="c", format="dicom", path=folder, index="index.csv", task="classification", dims=3
    )


def _write_medmnist(folder: Path) -> Dataset:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 255, (2, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = np.array([[0], [1]])
    np.savez(folder / "m.npz", **arrays)
    return Dataset(
        name="c", format="medmnist", path=folder / "m.npz", task="classification", dims=2
    )


def _write_stack(folder: Path) -> Dataset:
    tifffile.imwrite(folder / "v.tif", np.zeros((3, 20, 24), np.uint16), photometric="minisblack")
    return _dataset(folder, "stack", "v.tif")


def _write_wsi(folder: Path) -> Dataset:
    rgb = np.random.default_rng(0).integers(0, 255, (40, 48, 3), np.uint8)
    tifffile.imwrite(
        folder / "s.tif", rgb, photometric="rgb", tile=(16, 16), resolution=(2e4, 2e4),
        resolutionunit="CENTIMETER",
    )  # fmt: skip
    return _dataset(folder, "wsi", "s.tif")


VOLUME = np.random.default_rng(1).integers(0, 65535, (5, 20, 24), np.uint16)
ARRAYS = {"raw": "volumes/raw"}


def _volume_dataset(folder: Path, fmt: str, name: str) -> Dataset:
    (folder / "index.csv").write_text(f"image,label,split\n{name},0,train\n")
    return Dataset(
        name="c", format=fmt, path=folder, index="index.csv", task="classification", dims=3,
        volume=ARRAYS,
    )  # fmt: skip


def _write_hdf5(folder: Path) -> Dataset:
    with h5py.File(folder / "v.h5", "w") as f:
        f.create_dataset("volumes/raw", data=VOLUME, chunks=(2, 8, 8))
    return _volume_dataset(folder, "hdf5", "v.h5")


def _write_zarr(folder: Path) -> Dataset:
    group = zarr.open_group(folder / "v.zarr", mode="w")
    group.create_array("volumes/raw", shape=VOLUME.shape, chunks=(2, 8, 8), dtype=VOLUME.dtype)
    group["volumes/raw"][:] = VOLUME
    return _volume_dataset(folder, "zarr", "v.zarr")


# One fixture per registered reader: a new format adds a line here, and the contract
# below checks it (the first test fails until it does).
FIXTURES: dict[str, Callable[[Path], Dataset]] = {
    "images": _write_images,
    "nifti": _write_nifti,
    "dicom": _write_dicom,
    "medmnist": _write_medmnist,
    "wsi": _write_wsi,
    "stack": _write_stack,
    "hdf5": _write_hdf5,
    "zarr": _write_zarr,
}


def _nifti_columns(folder: Path) -> Dataset:
    """A CT/PET pair as two index columns (`channels:`, issue 30)."""
    rng = np.random.default_rng(2)
    for name in ("ct", "pet"):
        vol = rng.normal(size=(4, 5, 6)).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.diag([2.0, 2.0, 3.0, 1.0])), folder / f"{name}.nii")
    (folder / "index.csv").write_text("ct,pet,label,split\nct.nii,pet.nii,0,train\n")
    inputs = [{"source": s} for s in ("ct", "pet", "ct")]
    return Dataset(
        name="c", format="nifti", path=folder, index="index.csv", task="classification",
        dims=3, channels={"mode": "rgb", "inputs": inputs},
    )  # fmt: skip


def _nifti_4d(axis: str) -> Callable[[Path], Dataset]:
    def write(folder: Path) -> Dataset:
        seqs = np.random.default_rng(3).normal(size=(3, 10, 5, 6)).astype(np.float32)
        vol = seqs if axis == "first" else np.moveaxis(seqs, 0, -1)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), folder / "b.nii.gz")
        (folder / "index.csv").write_text("image,label,split\nb.nii.gz,0,train\n")
        inputs = [{"source": s} for s in (2, 0, 1)]
        return Dataset(
            name="c", format="nifti", path=folder, index="index.csv", task="classification",
            dims=3, channels={"mode": "rgb", "inputs": inputs, "sequence_axis": axis},
        )  # fmt: skip

    return write


# Inputs of a registered reader that read otherwise (multi-channel NIfTI samples): the
# contract below covers them too.
VARIANTS: dict[str, Callable[[Path], Dataset]] = {
    "nifti-columns": _nifti_columns,
    "nifti-4d-first": _nifti_4d("first"),
    "nifti-4d-last": _nifti_4d("last"),
}
CASES = {**FIXTURES, **VARIANTS}


def test_every_reader_has_a_contract_fixture():
    assert set(FIXTURES) == set(readers.READERS)


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_header_size_is_the_decoded_shape(tmp_path, fmt):
    ds = CASES[fmt](tmp_path)
    if fmt == "wsi":
        got, size = _decode(ds, tmp_path, "s.tif")
        assert size == got.shape[1:3]
        return
    for s in readers.list_samples(ds)[:3]:
        got = readers.load(ds, s).image
        assert got.shape[0] == s.n_items
        assert readers.header(ds, s).size == got.shape[1:3], fmt


def _slide_regions(folder: Path, ds: Dataset) -> tuple[Sample, np.ndarray]:
    whole = tifffile.imread(folder / "s.tif")
    return _slide_sample(folder, "s.tif"), np.stack(
        [whole[y : y + TILE, x : x + TILE] for x, y in XY]
    )


def _volume_regions(folder: Path, ds: Dataset) -> tuple[Sample, np.ndarray]:
    (s,) = readers.list_samples(ds)
    if ds.format == "hdf5":
        with h5py.File(folder / "v.h5", "r") as f:
            whole = f["volumes/raw"][:]
    else:
        whole = zarr.open_array(folder / "v.zarr", path="volumes/raw", mode="r")[:]
    return s, whole[..., None]


# Per tiled reader: a sample and its items, (n, H, W[, C]), read whole by the file's
# own library; the items read alone and in one run must equal them.
REGIONS: dict[str, Callable[[Path, Dataset], tuple[Sample, np.ndarray]]] = {
    "wsi": _slide_regions,
    "hdf5": _volume_regions,
    "zarr": _volume_regions,
}


def test_every_tiled_reader_has_a_region_fixture():
    assert set(REGIONS) == {f for f, r in readers.READERS.items() if r.tiled}


@pytest.mark.parametrize("fmt", sorted(REGIONS))
def test_a_region_is_the_crop_of_a_whole_read(tmp_path, fmt):
    """Items read alone, in one batch and one by one, equal the same regions of the
    whole decoded independently (tifffile.imread, h5py, zarr)."""
    ds = FIXTURES[fmt](tmp_path)
    s, whole = REGIONS[fmt](tmp_path, ds)
    batch = readers.load(ds, s, as_read=True, items=range(s.n_items)).image
    assert batch.shape == whole.shape and batch.dtype == whole.dtype
    for k in range(s.n_items):
        alone = readers.load(ds, s, as_read=True, items=range(k, k + 1)).image[0]
        np.testing.assert_array_equal(alone, whole[k])
        np.testing.assert_array_equal(batch[k], alone)
    middle = readers.load(ds, s, as_read=True, items=range(1, 3)).image
    np.testing.assert_array_equal(middle, whole[1:3])


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_listing_decodes_no_pixels(tmp_path, fmt, monkeypatch):
    """Listing and fingerprinting read headers only (a slide: its low-resolution level
    for tissue, outside `decode`): a reader's `decode` is never called."""
    ds = CASES[fmt](tmp_path)
    reader = readers.reader_for(ds)

    def no_decode(*_a: object, **_k: object) -> None:
        raise AssertionError(f"{fmt}: listing decoded pixels")

    monkeypatch.setattr(type(reader), "decode", no_decode)
    prep = readers.prepare(ds)
    assert prep.samples and prep.fingerprint


def _files_of(path: Path) -> set[Path]:
    return {p for p in path.rglob("*") if p.is_file()} if path.is_dir() else {path}


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_files_cover_every_byte_a_sample_decodes_from(tmp_path, fmt):
    """`files()` lists the sample's image (every file of a folder) and its mask."""
    ds = CASES[fmt](tmp_path)
    reader = readers.reader_for(ds)
    for s in readers.list_samples(ds):
        listed = {Path(p) for p in reader.files(ds, s)}
        image = ds.path if fmt == "medmnist" else Path(s.image)  # medmnist: "split:i"
        assert _files_of(image) <= listed, (fmt, s.image)
        assert {Path(p) for p in s.sources} <= listed, (fmt, s.sources)  # every channel
        if s.mask:
            assert _files_of(Path(s.mask)) <= listed, (fmt, s.mask)


@pytest.mark.parametrize("fmt", sorted(CASES))
def test_one_flipped_byte_changes_the_fingerprint(tmp_path, fmt):
    """Or, where the byte breaks the file (a CRC, a gzip stream, JSON metadata), the
    listing refuses it naming the file: a changed file is never the old set's data."""
    ds = CASES[fmt](tmp_path)
    before = readers.prepare(ds).fingerprint
    sample = readers.list_samples(ds)[0]
    files = sorted(readers.reader_for(ds).files(ds, sample))
    target = max(files, key=lambda p: Path(p).stat().st_size)  # pixel data, not a header
    data = bytearray(Path(target).read_bytes())
    data[len(data) // 2] ^= 0x01
    Path(target).write_bytes(bytes(data))
    try:
        after = readers.prepare(ds).fingerprint
    except BadInputError as exc:
        assert Path(target).name in str(exc) or Path(target).parent.name in str(exc), exc
        return
    assert after != before, (fmt, target)


def test_files_cover_the_mask_of_a_segmentation_sample(tmp_path):
    """The mask half of the files contract, on a reader whose samples have masks."""
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "i.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "m.png")
    (tmp_path / "index.csv").write_text("image,mask,split\ni.png,m.png,train\n")
    ds = Dataset(
        name="s", format="images", path=tmp_path, index="index.csv", task="segmentation",
        dims=2, classes=["bg", "fg"],
    )  # fmt: skip
    (s,) = readers.list_samples(ds)
    listed = {Path(p) for p in readers.READERS["images"].files(ds, s)}
    assert {tmp_path / "i.png", tmp_path / "m.png"} <= listed
    before = readers.prepare(ds).fingerprint
    Image.fromarray(np.full((8, 8), 1, np.uint8) * np.eye(8, dtype=np.uint8)).save(
        tmp_path / "m.png"
    )
    assert readers.prepare(ds).fingerprint != before
