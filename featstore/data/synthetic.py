"""The embedded default data: small synthetic datasets written as real files.

Generated deterministically (fixed seed) the first time a manifest needs them, as PNG
images + index.csv (2D) or NIfTI volumes + index.csv (3D), and then read back through
the same readers as user data. Same seed, same bytes.

- cls2d: 3 lesion classes on a noisy body outline: 0 smooth disc, 1 spiculated star,
  2 textured ring.
- seg2d: 1-3 structures per image, labels 1 (bright disc), 2 (dark ellipse), 3 (bar).
- cls3d: volumes with (1) or without (0) a nodule-like blob.
- seg3d: volumes with two labelled ellipsoid organs (1 bright, 2 dark).
- slides: pyramidal TIFF slides with tissue, class 1 with nuclei nests
  (`featstore.data.synthetic_slides`).
- petct3d: co-registered CT and PET phantom volumes with lesion masks, index columns
  `ct` and `pet` (`featstore.data.synthetic_petct`).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image

from featstore.data import synthetic_petct
from featstore.data.settings import Synthetic
from featstore.data.synthetic_slides import generate_slides
from featstore.errors import BadInputError

SPLIT_CYCLE = ("train",) * 6 + ("val",) * 2 + ("test",) * 2


def _background(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A body-like ellipsoid with smooth texture and noise, values ~[0, 1]."""
    from scipy import ndimage  # 0.4 s to import: only when images are made

    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radii = rng.uniform(0.75, 0.95, len(shape))
    body = sum((g / r) ** 2 for g, r in zip(grids, radii, strict=True)) < 1
    texture = ndimage.gaussian_filter(rng.normal(size=shape), sigma=max(shape) / 16)
    texture /= np.abs(texture).max() + 1e-6
    img = body * (0.35 + 0.1 * texture)
    return img + rng.normal(scale=0.04, size=shape)


def _ellipse(shape: tuple[int, ...], center: ArrayLike, radii: ArrayLike) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    c, r = np.asarray(center, np.float64), np.asarray(radii, np.float64)
    dist = np.zeros(shape)
    for axis, g in enumerate(grids):
        dist += ((g - c[axis]) / r[axis]) ** 2
    return dist <= 1


def _lesion2d(rng: np.random.Generator, size: int, kind: int) -> np.ndarray:
    """Intensity offset of one lesion of class `kind` on a (size, size) canvas."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    r0 = rng.uniform(0.12, 0.18) * size
    dist = np.hypot(yy - cy, xx - cx)
    if kind == 0:  # smooth disc
        return 0.45 * (dist < r0)
    if kind == 1:  # spiculated star
        angle = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, np.pi)
        spikes = r0 * (0.55 + 0.6 * np.abs(np.cos(rng.integers(4, 7) * angle / 2)) ** 3)
        return 0.5 * (dist < spikes)
    ring = (dist < r0) & (dist > 0.55 * r0)  # textured ring
    stripes = 0.5 + 0.5 * np.sin((xx + yy) * rng.uniform(0.9, 1.3))
    return 0.5 * ring * stripes


def _to_u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def _write_index(path: Path, header: list[str], rows: list[list[object]]) -> None:
    with (path / "index.csv").open("w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _save_nifti(arr: np.ndarray, path: Path) -> None:
    import nibabel as nib  # 0.3 s to import: only when volumes are written

    # Plain .nii: gzip headers carry a timestamp, which would break "same bytes twice".
    img = nib.Nifti1Image(arr, affine=np.diag([1.0, 1.0, 2.0, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def _gen_2d(spec: Synthetic, out: Path, rng: np.random.Generator) -> None:
    rows = []
    (out / "images").mkdir(parents=True)
    if spec.kind == "seg2d":
        (out / "masks").mkdir()
    for i in range(spec.n):
        sid = f"img{i:04d}"
        img = _background(rng, (spec.size, spec.size))
        split = SPLIT_CYCLE[i % len(SPLIT_CYCLE)]
        if spec.kind == "cls2d":
            label = i % 3
            img = img + _lesion2d(rng, spec.size, label)
            rows.append([f"images/{sid}.png", label, split])
        else:
            mask = np.zeros((spec.size, spec.size), np.uint8)
            s = spec.size
            for cls in range(1, int(rng.integers(1, 4)) + 1):
                c = rng.uniform(0.25, 0.75, 2) * s
                if cls == 1:
                    region = _ellipse(mask.shape, c, (0.12 * s, 0.12 * s))
                elif cls == 2:
                    region = _ellipse(mask.shape, c, rng.uniform(0.08, 0.2, 2) * s)
                else:
                    region = np.zeros_like(mask, bool)
                    y0 = int(c[0])
                    region[y0 : y0 + max(2, s // 16), int(0.2 * s) : int(0.8 * s)] = True
                mask[region] = cls
            img = img + np.select([mask == 1, mask == 2, mask == 3], [0.45, -0.25, 0.3], 0)
            Image.fromarray(mask).save(out / "masks" / f"{sid}.png")
            rows.append([f"images/{sid}.png", f"masks/{sid}.png", split])
        Image.fromarray(_to_u8(img)).save(out / "images" / f"{sid}.png")
    header = ["image", "label", "split"] if spec.kind == "cls2d" else ["image", "mask", "split"]
    _write_index(out, header, rows)


def _gen_3d(spec: Synthetic, out: Path, rng: np.random.Generator) -> None:
    rows = []
    (out / "volumes").mkdir(parents=True)
    shape = (spec.size, spec.size, spec.slices)  # x, y, z: axial slices along z
    for i in range(spec.n):
        sid = f"vol{i:03d}"
        vol = _background(rng, shape)
        patient = f"p{i // 2:03d}"  # two volumes per patient: tests grouped splits
        if spec.kind == "cls3d":
            label = i % 2
            if label:
                c = rng.uniform(0.35, 0.65, 3) * np.array(shape)
                r = rng.uniform(0.1, 0.16) * spec.size
                vol = vol + 0.5 * _ellipse(shape, c, (r, r, r * spec.slices / spec.size * 1.5))
            rows.append([f"volumes/{sid}.nii", label, patient])
        else:
            lab = np.zeros(shape, np.uint8)
            for cls, offset in ((1, 0.4), (2, -0.25)):
                c = np.array(
                    [0.33 if cls == 1 else 0.67, rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.6)]
                ) * np.array(shape)
                r = rng.uniform(0.12, 0.2, 3) * np.array([spec.size, spec.size, spec.slices * 1.5])
                region = _ellipse(shape, c, r)
                lab[region] = cls
                vol = vol + offset * region
            _save_nifti(lab, out / "volumes" / f"{sid}_seg.nii")
            rows.append([f"volumes/{sid}.nii", f"volumes/{sid}_seg.nii", patient])
        # Store as CT-like HU so the manifest's window settings mean something.
        hu = (np.clip(vol, 0, 1) * 1000 - 200).astype(np.int16)
        _save_nifti(hu, out / "volumes" / f"{sid}.nii")
    header = ["image", "label", "patient"] if spec.kind == "cls3d" else ["image", "mask", "patient"]
    _write_index(out, header, rows)


STAMP = ".featstore-synthetic.json"  # the spec a folder was generated from


def generate(spec: Synthetic, out: Path) -> Path:
    """Write the dataset into `out` unless it already holds this spec; return `out`.

    Files are written into a temporary sibling folder and renamed, so an interrupted
    generation never leaves a half-written dataset behind. A folder generated from
    another spec (`n`, `seed`, ... changed in the manifest) is replaced; a folder that
    featstore did not generate is never touched.
    """
    wanted = json.dumps(spec.model_dump(), sort_keys=True)
    stamp = out / STAMP
    if stamp.is_file() and stamp.read_text() == wanted:
        return out
    if out.exists() and not stamp.is_file() and any(out.iterdir()):
        raise BadInputError(
            f"{out}: the folder of a synthetic dataset holds files featstore did not "
            "generate; move them away (or give the dataset another `path`)"
        )
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left over from a killed run
    rng = np.random.default_rng(spec.seed)
    if spec.kind == "slides":
        rows = generate_slides(spec.n, spec.size, tmp, rng)
        _write_index(tmp, ["image", "label", "patient"], rows)
    elif spec.kind == "petct3d":
        _write_index(tmp, synthetic_petct.HEADER, synthetic_petct.generate_petct(spec, tmp, rng))
    else:
        (_gen_3d if spec.kind.endswith("3d") else _gen_2d)(spec, tmp, rng)
    (tmp / STAMP).write_text(wanted)
    out.parent.mkdir(parents=True, exist_ok=True)
    if stamp.is_file() and stamp.read_text() == wanted:  # another process finished first
        shutil.rmtree(tmp)
        return out
    if out.exists():  # generated from another spec: set it aside, then delete it
        aside = out.with_name(f".{out.name}.old{os.getpid()}")
        os.rename(out, aside)
        shutil.rmtree(aside)
    try:
        tmp.rename(out)
    except OSError:  # another process finished first; keep its copy
        shutil.rmtree(tmp)
    return out
