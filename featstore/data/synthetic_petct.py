"""Synthetic PET/CT phantoms (`synthetic: {kind: petct3d}`): co-registered CT and PET
volumes written as real NIfTI files, for the seed's PET/CT case (CT alone, PET alone,
CT+PET) without any PET data on this machine.

Each volume is a body with two lungs and a spine in CT (Hounsfield units, int16) and
its PET twin (SUV, float32) on the same grid and affine. Lesions (label 1 of the
`_seg` volume) are what only both views find together:

- in CT a lesion is soft tissue (52 HU), a few HU above the body's 40 and under the
  noise, except in a lung, where it stands out;
- in PET it is hot (SUV 5-9), but so are a heart and a bladder (physiological uptake,
  not lesions), which CT shows as structures of their own.

The index has columns `image` (the CT), `ct`, `pet`, `mask` and `patient`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featstore.data.settings import Synthetic

# Both images share this voxel -> mm map (2 x 2 x 3 mm voxels): co-registered.
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _blob(shape: tuple[int, ...], center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii, strict=True))
    return np.asarray(dist <= 1)


def _save(arr: np.ndarray, path: Path) -> None:
    import nibabel as nib  # 0.3 s to import: only when volumes are written

    img = nib.Nifti1Image(arr, affine=AFFINE)  # plain .nii: same bytes on every run
    img.header.set_xyzt_units("mm")
    nib.save(img, path)


def phantom(
    rng: np.random.Generator, size: int, slices: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (ct HU int16, pet SUV float32, lesion mask uint8) triple, each (size, size,
    slices) in x, y, z order."""
    shape = (size, size, slices)
    dims = np.array(shape, np.float64)
    body = _blob(shape, dims / 2, dims * np.array([0.45, 0.38, 0.7]))
    lungs = [_blob(shape, dims * np.array([x, 0.45, 0.5]), dims * 0.16) for x in (0.3, 0.7)]
    spine = _blob(shape, dims * np.array([0.5, 0.75, 0.5]), dims * np.array([0.06, 0.06, 0.7]))
    heart = _blob(shape, dims * np.array([0.55, 0.45, 0.4]), dims * 0.1)
    bladder = _blob(shape, dims * np.array([0.5, 0.5, 0.85]), dims * np.array([0.1, 0.1, 0.08]))
    lesions = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 3))):
        c = dims * rng.uniform([0.25, 0.3, 0.2], [0.75, 0.7, 0.8])
        lesions |= _blob(shape, c, dims * rng.uniform(0.08, 0.13)) & body
    lesions &= ~(heart | bladder | spine)

    ct = np.full(shape, -1000.0)  # air
    ct[body] = 40.0  # soft tissue
    for lung in lungs:
        ct[lung & body] = -800.0
    ct[heart] = 55.0
    ct[bladder] = 5.0  # urine: water
    ct[spine] = 700.0  # bone
    ct[lesions] = 52.0  # soft tissue: faint beside tissue (40), clear in a lung
    ct += rng.normal(scale=20.0, size=shape)

    pet = np.where(body, 1.0, 0.05)
    pet[heart] = 4.5
    pet[bladder] = 8.0
    pet[lesions] = rng.uniform(5.0, 9.0)
    pet = pet * rng.lognormal(sigma=0.15, size=shape)
    return ct.round().astype(np.int16), pet.astype(np.float32), lesions.astype(np.uint8)


def generate_petct(spec: Synthetic, out: Path, rng: np.random.Generator) -> list[list[object]]:
    """Write `spec.n` CT/PET/mask volume triples into `out/volumes`; the index rows
    (image, ct, pet, mask, patient)."""
    (out / "volumes").mkdir(parents=True)
    rows: list[list[object]] = []
    for i in range(spec.n):
        sid = f"vol{i:03d}"
        ct, pet, mask = phantom(rng, spec.size, spec.slices)
        names = [f"volumes/{sid}_{part}.nii" for part in ("ct", "pet", "seg")]
        for arr, name in zip((ct, pet, mask), names, strict=True):
            _save(arr, out / name)
        rows.append([names[0], names[0], names[1], names[2], f"p{i // 2:03d}"])
    return rows


HEADER = ["image", "ct", "pet", "mask", "patient"]
