"""A slide's level-0 pixel size (um): which source wins, and what a disagreement says.

A value the user wrote in the index's `mpp` column wins over the file: where the
file's own calibration differs from it by more than AGREE (5%), a note says which
was used (extract prints it; the set keeps it in `dataset.pixel_size_notes`).
Without the column, the file's calibration: Aperio `MPP`, OME `PhysicalSizeX`, or
TIFF resolution tags of at most MAX_TAG_MPP (10 um/px): 72 or 300 dpi (353 or 85
um/px) is a software default, not a microscope, and counts as no calibration.
Neither is an error naming the slide and both fixes: a magnification is never guessed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from featstore.errors import BadInputError

if TYPE_CHECKING:
    from tiffslide import TiffSlide

MPP_RANGE = (0.02, 100.0)  # um/px a microscope records; 72 dpi (352 um) is a screen default
# TIFF resolution tags coarser than this are a software's dpi default (300 dpi is
# 84.7 um, 2400 dpi 10.6 um), not a scanner's calibration (0.1 to 2 um at 5x to 100x)
MAX_TAG_MPP = 10.0
AGREE = 0.05  # the index's mpp and the file's disagree past this fraction: say which won
FIX_MPP = (
    "give it in the index's `mpp` column (um per level-0 pixel, e.g. 0.25 at 40x, "
    "0.5 at 20x), or write it into the file (Aperio MPP, OME PhysicalSizeX, or TIFF "
    "resolution tags); featstore never guesses a magnification"
)


@dataclass(frozen=True)
class PixelSize:
    """A slide's level-0 pixel size in um, where it came from (`Tiles.mpp_source`),
    and, where the index and the file disagree, which one was used and why."""

    mpp: float
    source: str
    note: str = ""


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def calibration(slide: TiffSlide) -> tuple[PixelSize | None, str]:
    """The file's own pixel size when it records a credible one (Aperio MPP, OME
    PhysicalSizeX, TIFF resolution tags of at most MAX_TAG_MPP um), and a phrase
    naming the tags passed over as a default ("" when none were)."""
    props = slide.properties
    found = [(_number(props.get("aperio.MPP")), "file: Aperio MPP", MPP_RANGE[1])]
    tf = slide.ts_tifffile
    if tf.is_ome and tf.ome_metadata:
        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tf.ome_metadata)
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tf.ome_metadata)
        scale = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit[1] if unit else "µm")
        value = _number(m[1]) if m else None
        if value is not None and scale:
            found.append((value * scale, "file: OME PhysicalSizeX", MPP_RANGE[1]))
    tag = _number(props.get("tiffslide.mpp-x")) if "tiff.XResolution" in props else None
    found.append((tag, "file: TIFF resolution tags", MAX_TAG_MPP))
    for mpp, source, top in found:
        if mpp is not None and MPP_RANGE[0] <= mpp <= top:
            return PixelSize(mpp, source), ""
    if tag is None:
        return None, ""
    dpi = f"{props.get('tiff.XResolution')} per {str(props.get('tiff.ResolutionUnit')).lower()}"
    return None, (
        f"its TIFF resolution tags say {dpi} ({tag:g} um/px), a software default, not a "
        "microscope's calibration"
    )


def pixel_size(path: Path, slide: TiffSlide, column: str) -> PixelSize:
    """The slide's level-0 pixel size: the index's `mpp` column where the user gave one
    (a value written down wins; a note says so where the file disagrees by more than
    AGREE), else the file's calibration, else a `BadInputError` naming both fixes."""
    given, (found, passed_over) = column.strip(), calibration(slide)
    if not given:
        if found is not None:
            return found
        why = f" ({passed_over})" if passed_over else ""
        raise BadInputError(f"{path}: the slide records no pixel size{why}; {FIX_MPP}")
    mpp = _number(given)
    if mpp is None or not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        raise BadInputError(
            f"{path}: mpp {given!r} in the index is not a pixel size from "
            f"{MPP_RANGE[0]} to {MPP_RANGE[1]} um; {FIX_MPP}"
        )
    note = ""
    if found is not None and abs(found.mpp - mpp) > AGREE * min(found.mpp, mpp):
        note = (
            f"pixel size {mpp:g} um from the index's mpp column used; the file says "
            f"{found.mpp:g} um ({found.source.removeprefix('file: ')}). The index wins: "
            "fix whichever is wrong"
        )
    return PixelSize(mpp, "index: mpp column", note)
