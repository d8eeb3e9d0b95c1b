"""Synthetic whole-slide images: real pyramidal TIFFs with known tissue and a class signal.

Each slide is `size` x `size` RGB pixels at 0.5 um/px (TIFF resolution tags), JPEG
tiles of 256 px, with two more levels (2x, 4x) in SubIFDs, as scanners write them.
Tissue is a few pink (eosin-like) blobs on white glass; class 1 slides also hold
dense purple (hematoxylin-like) nuclei nests inside the tissue, class 0 slides sparse
nuclei only. Two slides per patient, so that patient-level splits are exercised.
`write_pyramid` writes any slide tile by tile, so a test can make a 40,000 px one
without holding it in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

MPP = 0.5  # um per level-0 pixel of the synthetic slides
GLASS = (242, 240, 244)
EOSIN = np.array([222, 150, 190], np.float32)
HEMATOXYLIN = np.array([95, 60, 150], np.float32)
# (level, y, x, side) -> (side, side, 3) uint8, or that tile already encoded
Tile = Callable[[int, int, int, int], np.ndarray | bytes]


def write_pyramid(
    path: Path,
    size: tuple[int, int],
    tile: Tile,
    levels: int = 3,
    mpp: float | None = MPP,
    compression: str = "jpeg",
    side: int = 256,
) -> None:
    """A tiled pyramidal TIFF of (height, width) `size`, level i downsampled 2**i, its
    tiles produced one at a time by `tile(level, y, x, side)` (uint8 RGB). `mpp`: the
    level-0 pixel size written as TIFF resolution tags (None: no pixel size)."""
    h, w = size

    def tiles(level: int) -> Iterator[Any]:  # arrays, or bytes already encoded
        lh, lw = -(-h // 2**level), -(-w // 2**level)
        for y in range(0, lh, side):
            for x in range(0, lw, side):
                yield tile(level, y, x, side)

    with tifffile.TiffWriter(path, bigtiff=h * w * 3 > 2**31) as tw:
        for level in range(levels):
            lh, lw = -(-h // 2**level), -(-w // 2**level)
            extra: dict[str, object] = {}
            if mpp is not None:
                px_per_cm = 1e4 / (mpp * 2**level)
                extra = {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}
            tw.write(
                tiles(level),
                shape=(lh, lw, 3),
                dtype=np.uint8,
                tile=(side, side),
                compression=compression,
                photometric="rgb",
                subifds=levels - 1 if level == 0 else None,
                subfiletype=1 if level else 0,
                **extra,  # type: ignore[arg-type]
            )


def _blobs(rng: np.random.Generator, size: int, n: int) -> np.ndarray:
    """(size, size) bool: n elliptic blobs (drawn on an 8x coarser grid, then enlarged)."""
    g = max(1, size // 8)
    yy, xx = np.mgrid[:g, :g].astype(np.float32)
    out = np.zeros((g, g), bool)
    for _ in range(n):
        cy, cx = rng.uniform(0.25, 0.75, 2) * g
        ry, rx = rng.uniform(0.12, 0.22, 2) * g
        out |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    return np.kron(out, np.ones((8, 8), bool))[:size, :size]


def slide_image(rng: np.random.Generator, size: int, label: int) -> np.ndarray:
    """(size, size, 3) uint8 level 0 of one synthetic slide of class `label`.

    Nuclei are 4 x 4 px squares (2 um at 0.5 um/px) on a 4-px grid."""
    tissue = _blobs(rng, size, int(rng.integers(2, 4)))
    q = -(-size // 4)
    nuclei = rng.random((q, q)) < (0.03 if label == 0 else 0.01)
    if label == 1:  # nests: clusters of dense nuclei inside the tissue
        nests = _blobs(rng, size, 3)[::4, ::4]
        nuclei |= nests & (rng.random((q, q)) < 0.5)
    nuclei = np.kron(nuclei, np.ones((4, 4), bool))[:size, :size] & tissue
    img = np.empty((size, size, 3), np.float32)
    img[:] = GLASS
    img[tissue] = EOSIN
    img[nuclei] = HEMATOXYLIN
    img += rng.normal(0, 4, (size, size, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_slide(path: Path, image: np.ndarray) -> None:
    """A 3-level pyramidal TIFF of an in-memory (h, w, 3) uint8 level 0."""
    pyramid = [image]
    for _ in range(2):
        p = pyramid[-1]
        h, w = p.shape[0] // 2 * 2, p.shape[1] // 2 * 2
        pyramid.append(p[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean((1, 3)).astype(np.uint8))

    def tile(level: int, y: int, x: int, side: int) -> np.ndarray:
        out = np.full((side, side, 3), GLASS, np.uint8)
        part = pyramid[level][y : y + side, x : x + side]
        out[: part.shape[0], : part.shape[1]] = part
        return out

    write_pyramid(path, image.shape[:2], tile)


def generate_slides(n: int, size: int, out: Path, rng: np.random.Generator) -> list[list[object]]:
    """Write n slides into out/slides; index rows (image, label, patient)."""
    (out / "slides").mkdir(parents=True)
    rows: list[list[object]] = []
    for i in range(n):
        label = (i // 2) % 2  # both slides of a patient share the class
        name = f"slides/slide{i:03d}.tif"
        write_slide(out / name, slide_image(rng, size, label))
        rows.append([name, label, f"p{i // 2:03d}"])
    return rows
