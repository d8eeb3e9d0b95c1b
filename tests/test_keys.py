"""Sets on disk keep their keys: the cache keys of a few fixed identities, recorded in
tests/fixtures/keys.json when they were made (2026-12-07, format 4), are recomputed.

A refactor that changes a key silently orphans every set of a user's cache. A change
that must change what a set holds (a decode rule, the format) bumps a version, and is
the one reason to rewrite this file: `python tests/test_keys.py --write`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

from featstore.data.settings import Intensity
from featstore.identity import EncoderInfo, Recipe, SetIdentity

FIXTURE = Path(__file__).parent / "fixtures" / "keys.json"
WEIGHTS = EncoderInfo("e", "src", "a" * 64, "dinov3_vit", 16, 4, 384, (0.5,) * 3, (0.2,) * 3, True)
BASE = Recipe(
    dataset="f" * 64,
    task="classification",
    dims=2,
    slice_axis="axial",
    fill_outlines=False,
    mask_map=(),
    metadata=(),
    resolution=224,
    intensity=Intensity(mode="minmax"),
    fit="resize",
    layers=1,
    dtype="float16",
    patch=True,
)
CASES = {
    "png-classification": replace(BASE, decode=1),
    "synthetic-classification": BASE,
    "nifti-segmentation-window": replace(
        BASE, task="segmentation", dims=3, intensity=Intensity(mode="window", center=40, width=400)
    ),
    "slides-tiled": replace(BASE, tiling=(("tile_mpp", 0.5), ("tile_size", 224)), decode=1),
    "int8-pooled-layers": replace(BASE, quantize="int8", patch_pool=2, patch_layers=(-4, -1)),
}


def keys() -> dict[str, str]:
    return {name: SetIdentity(r, "e").with_weights(WEIGHTS).key() for name, r in CASES.items()}


def test_sets_on_disk_keep_their_keys():
    assert keys() == json.loads(FIXTURE.read_text())


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    FIXTURE.write_text(json.dumps(keys(), indent=2) + "\n")
