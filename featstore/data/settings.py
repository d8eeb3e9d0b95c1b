"""The manifest's nested blocks: intensity, splits, glob index, tiling, synthetic
data, label efficiency and per-encoder preprocessing (`featstore.data.manifest`
puts them together into datasets and the manifest, and re-exports them).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

Format = Literal[
    "medmnist", "images", "nifti", "dicom", "wsi", "stack", "hdf5", "zarr", "synthetic"
]


@dataclass(frozen=True)
class FormatRules:
    """What a format's datasets must say in the manifest (its reader lives in readers.py)."""

    dims: tuple[int, ...]  # the `dims:` it holds
    holds: str  # what one sample is, for the message when `dims` does not fit
    index: bool = True  # needs `index:` (a CSV or a glob), one row per sample
    # the version of the pixel layout rules it decodes by (featstore.data.layouts), in
    # the recipe of its sets; None where its reader follows no such rules
    decode: int | None = None


# Bump when a rule of featstore.data.layouts (or the alpha/CMYK handling of PIL images
# in pictures.py) changes what a page decodes to, so that no set made under the older
# rules is reused. 1: TIFFs decoded by those rules instead of PIL; colour stack pages
# as luma, not the red channel; slide levels never cast modulo 256; alpha on white.
DECODE_VERSION = 1
# The same for DICOM's photometric rules (featstore.data.dicom). 1: MONOCHROME1 reflected
# to MONOCHROME2 (it was read as stored), PALETTE COLOR refused.
DICOM_DECODE_VERSION = 1
# The one table of per-format manifest rules; a new format adds its name to `Format`,
# a row here and a reader in `featstore.data.readers.READERS`.
FORMATS: dict[str, FormatRules] = {
    "medmnist": FormatRules((2, 3), "a MedMNIST npz", index=False),
    "images": FormatRules((2,), "2D images", decode=DECODE_VERSION),
    "nifti": FormatRules((3,), "volumes"),
    "dicom": FormatRules((3,), "volumes", decode=DICOM_DECODE_VERSION),
    "wsi": FormatRules((2,), "slides, classified from 2D tiles", decode=DECODE_VERSION),
    "stack": FormatRules(
        (3,), "one volume per sample (a multi-page TIFF or a folder)", decode=DECODE_VERSION
    ),
    "hdf5": FormatRules((3,), "one volume per file, read by its `volume:` paths"),
    "zarr": FormatRules((3,), "one volume per Zarr folder, read by its `volume:` paths"),
    "synthetic": FormatRules((2, 3), "generated data", index=False),
}
# Formats whose files hold named arrays (`volume:` block), read slice run by slice run.
VOLUME_FORMATS = ("hdf5", "zarr")

# Bounds checked before anything is allocated: a typo (224000) must not reach
# `np.empty((n, 3, r, r))` or a zarr allocation.
MIN_RESOLUTION, MAX_RESOLUTION = 16, 4096


class Frozen(BaseModel):
    # allow_inf_nan: `.nan` passes every `<`/`>` check, e.g. ratios [.nan, .nan, .nan]
    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False
    )


def check_resolutions(v: tuple[int, ...]) -> tuple[int, ...]:
    if not v or not all(MIN_RESOLUTION <= r <= MAX_RESOLUTION for r in v):
        raise ValueError(
            f"resolutions must be a non-empty list of sizes from {MIN_RESOLUTION} to "
            f"{MAX_RESOLUTION}, e.g. [224]"
        )
    return v


Resolutions = Annotated[tuple[int, ...], AfterValidator(check_resolutions)]


class Intensity(Frozen):
    """How raw intensities map to [0, 1] before the encoder's mean/std."""

    mode: Literal["none", "minmax", "window", "percentile"] = "minmax"
    center: float | None = None  # window centre (e.g. HU for CT)
    width: float | None = None  # window width
    low: float = 0.5  # percentile clipping, in percent
    high: float = 99.5

    @model_validator(mode="after")
    def _check(self) -> Intensity:
        if self.mode == "window" and (self.center is None or self.width is None or self.width <= 0):
            raise ValueError(
                "mode 'window' needs center and a positive width, e.g. "
                "{mode: window, center: 40, width: 400}"
            )
        if self.mode == "percentile" and not 0 <= self.low < self.high <= 100:
            raise ValueError("mode 'percentile' needs 0 <= low < high <= 100")
        return self


# Sequences a 4D NIfTI may hold along an axis `sequence_axis: auto` infers (BraTS: 4)
MAX_SEQUENCES = 8
# Encoder input channels of `channels: {mode: rgb}`; a per-channel dataset may list more
RGB, MAX_INPUTS = 3, 16


class ChannelInput(Frozen):
    """One input of a `channels:` block: a source and its own intensity rule.

    source: an index column holding the file of this image (`ct`, `pet`), or the
    index (0, 1, ...) of a sequence of each sample's 4D NIfTI volume.
    """

    source: int | str
    intensity: Intensity = Intensity()

    @field_validator("source", mode="before")
    @classmethod
    def _not_bool(cls, v: object) -> object:
        if isinstance(v, bool):  # YAML reads `yes`/`on` as true, which int would take as 1
            raise ValueError(f"source {v!r}: name an index column or a sequence index")
        return v

    @model_validator(mode="after")
    def _check(self) -> ChannelInput:
        if isinstance(self.source, int) and not 0 <= self.source < 1024:
            raise ValueError(f"source {self.source}: a sequence index counts from 0")
        if isinstance(self.source, str) and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.source):
            raise ValueError(
                f"source {self.source!r}: name an index column (letters, digits, _.-), "
                "e.g. ct, or a sequence index of a 4D volume, e.g. 0"
            )
        return self


class Channels(Frozen):
    """Several co-registered images per sample, mapped to the encoder's input channels:

        channels: {mode: rgb, inputs: [
            {source: ct, intensity: {mode: window, center: 40, width: 400}},
            {source: pet, intensity: {mode: window, center: 5, width: 10}},
            {source: ct, intensity: {mode: window, center: 40, width: 1500}}]}

    mode rgb: exactly three inputs, in order, become the R, G and B channels of one
    encoder input. mode per-channel: each input alone is encoded as grey (replicated
    to three channels), and its features are joined by `combine`: concat (channel
    dim = inputs x the encoder's width, in input order) or mean. Sources are all index
    columns or all sequence indices of a 4D NIfTI, whose sequence axis is the first or
    the last array axis (`auto`: the one of the two that holds at most MAX_SEQUENCES).
    Images of one sample must share one grid: same shape, and affines equal within
    `affine_tolerance` (mm); nothing is resampled.
    """

    mode: Literal["rgb", "per-channel"] = "rgb"
    combine: Literal["concat", "mean"] = "concat"
    inputs: tuple[ChannelInput, ...] = Field(min_length=1, max_length=MAX_INPUTS)
    sequence_axis: Literal["auto", "first", "last"] = "auto"
    affine_tolerance: float = Field(default=1e-3, ge=0, le=10)

    @model_validator(mode="after")
    def _check(self) -> Channels:
        if self.mode == "rgb" and len(self.inputs) != RGB:
            raise ValueError(
                f"mode 'rgb' maps exactly {RGB} inputs to the encoder's R, G and B channels "
                f"(got {len(self.inputs)}); repeat a source with another window, or use "
                "`mode: per-channel` to encode each input alone"
            )
        if self.mode == "rgb" and self.combine != "concat":
            raise ValueError(
                f"`combine: {self.combine}` joins the features of `mode: per-channel` only"
            )
        kinds = {type(i.source) for i in self.inputs}
        if len(kinds) > 1:
            raise ValueError(
                "sources are either all index columns (ct, pet) or all sequence indices "
                "of a 4D NIfTI (0, 1, 2, 3), not both"
            )
        if not self.sequences and self.sequence_axis != "auto":
            raise ValueError("`sequence_axis` goes with sequence-index sources (0, 1, ...)")
        return self

    @property
    def sequences(self) -> bool:
        """Whether sources are sequence indices of a 4D volume (else index columns)."""
        return isinstance(self.inputs[0].source, int)

    @property
    def sources(self) -> tuple[int | str, ...]:
        """The distinct sources, in order of first use: the channels a sample decodes to."""
        return tuple(dict.fromkeys(i.source for i in self.inputs))

    @property
    def groups(self) -> tuple[tuple[int, int, int], ...]:
        """The inputs (by position) on the R, G and B channels of each encoder input:
        rgb, one input ((0, 1, 2)); per-channel, one grey input per input ((k, k, k))."""
        if self.mode == "rgb":
            return ((0, 1, 2),)
        return tuple((k, k, k) for k in range(len(self.inputs)))

    def width(self, hidden: int) -> int:
        """Channels of the stored features for an encoder `hidden` wide."""
        concat = self.mode == "per-channel" and self.combine == "concat"
        return hidden * len(self.inputs) if concat else hidden


class Volume(Frozen):
    """The arrays of one volume inside an HDF5 file or a Zarr folder (`format: hdf5 |
    zarr`), by internal path, as CREMI ships them:

        volume: {raw: volumes/raw, labels: volumes/labels/neuron_ids,
                 resolution: resolution, unit: nm}

    raw: the (z, y, x) intensity array; items are its z slices. labels: the class-id
    array of the same shape (segmentation only). resolution: the name of `raw`'s
    attribute holding the (z, y, x) voxel size, in `unit` (CREMI: (40, 4, 4) nm);
    spacing is recorded in mm. Without it the spacing is unknown.
    """

    raw: str = Field(min_length=1, pattern=r"\S")
    labels: str | None = Field(default=None, min_length=1, pattern=r"\S")
    resolution: str | None = Field(default=None, min_length=1)
    unit: Literal["nm", "um", "mm"] = "nm"


class Splits(Frozen):
    """Either read from the data (`from: column`: the index's `split` column, MedMNIST's
    own keys) or assigned by ratio, whole patients at a time."""

    from_: Literal["column"] | None = Field(default=None, alias="from")
    ratios: tuple[float, float, float] | None = None
    seed: int = Field(default=0, ge=0)  # numpy's default_rng refuses negative seeds
    # contiguous: groups in natural order (section 2 before 10) cut into train, val,
    # test blocks, so neighbouring sections of a stack do not leak across splits
    order: Literal["random", "contiguous"] = "random"

    @model_validator(mode="after")
    def _check(self) -> Splits:
        if (self.from_ is None) == (self.ratios is None):
            raise ValueError("give exactly one of `from: column` or `ratios: [train, val, test]`")
        if self.ratios is not None and (
            min(self.ratios) < 0 or abs(sum(self.ratios) - 1) > 1e-6 or self.ratios[0] == 0
        ):
            raise ValueError(
                "ratios must be three non-negative numbers summing to 1 "
                "with a non-zero train share, e.g. [0.7, 0.1, 0.2]"
            )
        return self


class GlobIndex(Frozen):
    """An index built from file names, for data that ships without one.

    `glob` finds the images (relative to `path`); `mask` is a template for each
    image's mask, relative to the image's folder ({name}: file name, {stem}: name
    without extensions); `join` is an optional CSV whose `key` column holds image file
    names, and whose other columns (label, split, patient, metadata) are merged in.
    """

    glob: str
    mask: str | None = None
    join: str | None = None
    key: str = "filename"  # (not `on`: YAML 1.1 reads a bare `on` as true)

    @model_validator(mode="after")
    def _check(self) -> GlobIndex:
        if self.mask is not None:
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(self.mask) if f is not None}
            except ValueError as exc:  # an unmatched "{" or "}"
                fields = {f"({exc})"}
            if not fields <= {"name", "stem"}:
                raise ValueError(
                    f"mask template {self.mask!r} may use only {{name}} and {{stem}}, e.g. "
                    "'../labelsTr/{name}'"
                )
        return self


class Tiling(Frozen):
    """How a whole-slide image becomes tiles (`format: wsi`); part of a set's identity.

    Tiles of `tile_size` pixels at `tile_mpp` micrometres per pixel are read from the
    closest level at or finer than `tile_mpp` and resized; tissue is found at
    `tissue_mpp` and a tile is kept when at least `min_tissue` of it is tissue.
    """

    tile_mpp: float = Field(default=0.5, gt=0, le=1000)
    tile_size: int = Field(default=224, ge=16, le=MAX_RESOLUTION)
    overlap: float = Field(default=0.0, ge=0, le=0.9)  # fraction of a tile shared with the next
    max_tiles: int | None = Field(default=None, ge=1, le=1_000_000)  # per slide, seeded sample
    seed: int = Field(default=0, ge=0)
    min_tissue: float = Field(default=0.5, gt=0, le=1)
    tissue_mpp: float = Field(default=8.0, gt=0, le=1000)
    upsample: bool = False  # allow tile_mpp finer than the slide's base level


class Synthetic(Frozen):
    """A generated dataset (written as real PNG/CSV, NIfTI or pyramidal TIFF files on
    first use); `slides`: n slides of `size` x `size` pixels at 0.5 um/px; `petct3d`:
    co-registered CT and PET phantom volumes (index columns `ct`, `pet`)."""

    kind: Literal["cls2d", "seg2d", "cls3d", "seg3d", "slides", "petct3d"]
    n: int = Field(default=60, ge=6, le=100_000)
    size: int = Field(default=64, ge=16, le=8 * MAX_RESOLUTION)
    slices: int = Field(default=24, ge=1, le=1024)
    seed: int = Field(default=0, ge=0)


def _check_fractions(v: tuple[float, ...]) -> tuple[float, ...]:
    if not all(0 < f <= 1 for f in v) or len(set(v)) != len(v):
        raise ValueError(
            f"fractions {list(v)}: give distinct fractions of the train split in (0, 1], "
            "e.g. [0.01, 0.05, 0.1, 0.25, 0.5, 1]"
        )
    return tuple(sorted(v))


def _check_shots(v: tuple[int, ...]) -> tuple[int, ...]:
    if not all(k >= 1 for k in v) or len(set(v)) != len(v):
        raise ValueError(f"shots {list(v)}: give distinct numbers >= 1 per class, e.g. [1, 5, 10]")
    return tuple(sorted(v))


class LabelEfficiency(Frozen):
    """Label-efficiency points: probes fitted on nested, stratified parts of the train
    split (`featstore.probing.subsets`), each `repeats` times (repeat r: seed r)."""

    fractions: Annotated[tuple[float, ...], AfterValidator(_check_fractions)] = ()
    shots: Annotated[tuple[int, ...], AfterValidator(_check_shots)] = ()
    repeats: int = Field(default=1, ge=1, le=100)

    @model_validator(mode="after")
    def _some(self) -> LabelEfficiency:
        if not self.fractions and not self.shots:
            raise ValueError("label_efficiency needs `fractions:` or `shots:` (or both)")
        return self


def _blocks(v: tuple[int, ...]) -> tuple[int, ...]:
    if not v or len(set(v)) != len(v) or max(v) >= 0 or min(v) < -64:
        raise ValueError(
            "patch_layers must be distinct negative block indices counted from the "
            "end, e.g. [-4, -3, -2, -1] (-1 = the last block)"
        )
    return tuple(sorted(v))


PatchLayers = Annotated[tuple[int, ...], AfterValidator(_blocks)]


# An encoder's resize filter (antialiased PIL filters; see encode.preprocess)
Interpolation = Literal["bilinear", "bicubic"]
INTERPOLATIONS: tuple[Interpolation, ...] = ("bilinear", "bicubic")


class EncoderPreprocessing(Frozen):
    """Preprocessing that replaces an encoder's own config (recorded in its feature sets)."""

    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: Interpolation | None = None

    def items(self) -> tuple[tuple[str, object], ...]:
        """The fields that are set, as (name, value) pairs in field order."""
        return tuple((k, v) for k, v in self.model_dump().items() if v is not None)


class Instances(Frozen):
    """`instances:` of a segmentation dataset whose objects are neurons (EM): the heads
    are trained on the boundary class (class 1) and scored on instances as well
    (`featstore.probing.instances`: VOI split and merge, adapted Rand error).

    `instances: true` is `{labels: membrane}`. labels: `membrane`, the mask's class 1
    is the membrane and its connected non-membrane regions are the neurons (ISBI
    2012); `ids`, the label array holds a neuron id per pixel, and class 1 becomes the
    pixels whose id differs from an in-plane 4-neighbour's (CREMI's `neuron_ids`).
    labels is part of a set's identity. rule and threshold turn a head's predicted
    boundary probability into instances (probe-side, named in the rows' `rule`):
    `components`, connected components of the pixels below `threshold`
    (`scipy.ndimage.label`); `watershed`, those components as seeds of a watershed
    on the probability map (`skimage.segmentation.watershed`), so that every pixel
    belongs to a neuron.
    """

    labels: Literal["membrane", "ids"] = "membrane"
    rule: Literal["components", "watershed"] = "components"
    threshold: float = Field(default=0.5, gt=0, lt=1)

    @property
    def rule_name(self) -> str:
        """The rule as results rows name it: `components@0.5`, `watershed@0.3`."""
        return f"{self.rule}@{self.threshold:g}"
