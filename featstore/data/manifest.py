# Over 400 lines (518): the schema models and their validators read as one; split with issue 17.
"""The data manifest: schema, validation with errors that name the field, fingerprints.

The manifest is parsed once into frozen pydantic models; nothing downstream mutates
them. A typo is a `ManifestError` naming the dataset, the field and the fix.
"""

from __future__ import annotations

import difflib
import os
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from featstore.data.safe_yaml import parse_yaml
from featstore.errors import ManifestError
from featstore.store.location import place

Format = Literal["medmnist", "images", "nifti", "dicom", "wsi", "stack", "synthetic"]
Task = Literal["classification", "multilabel", "segmentation"]
Fit = Literal["resize", "pad"]  # pad: small images centred on a zero canvas
SPLITS = ("train", "val", "test")
DEFAULT_CACHE = "cache/features"
# Bounds checked before anything is allocated: a typo (224000) must not reach
# `np.empty((n, 3, r, r))` or a zarr allocation.
MIN_RESOLUTION, MAX_RESOLUTION = 16, 4096
MAX_BATCH_SIZE = 4096
MAX_LABEL = 65535  # largest class id without `classes:` (ids must fit the stored int64 and a probe)
# A manifest is a few KB; these refuse a hostile file before it costs memory or time.
# Names a feature set already uses for its variables, coordinates and dimensions: a
# `metadata:` coordinate of the same name would overwrite them (e.g. the splits).
RESERVED = {"item", "sample", "slice", "split", "label", "cls", "patch", "mask", "channel"}
RESERVED |= {"layer", "patch_layer", "row", "col", "class", "y", "x"}
# what extraction records from the raw data (featstore.store.schema.NATIVE, EXAMPLES)
RESERVED |= {"native_rows", "native_cols", "native_slice_mm", "native_row_mm", "native_col_mm"}
RESERVED |= {"example", "example_item", "thumbnail", "thumb_y", "thumb_x"}
RESERVED |= {"overview", "overview_tissue", "overview_scale", "overview_y", "overview_x", "rgb"}


_COORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class _Frozen(BaseModel):
    # allow_inf_nan: `.nan` passes every `<`/`>` check, e.g. ratios [.nan, .nan, .nan]
    model_config = ConfigDict(
        frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False
    )


def _check_resolutions(v: tuple[int, ...]) -> tuple[int, ...]:
    if not v or not all(MIN_RESOLUTION <= r <= MAX_RESOLUTION for r in v):
        raise ValueError(
            f"resolutions must be a non-empty list of sizes from {MIN_RESOLUTION} to "
            f"{MAX_RESOLUTION}, e.g. [224]"
        )
    return v


Resolutions = Annotated[tuple[int, ...], AfterValidator(_check_resolutions)]


class Intensity(_Frozen):
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


class Splits(_Frozen):
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


class GlobIndex(_Frozen):
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


class Tiling(_Frozen):
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


class Synthetic(_Frozen):
    """A generated dataset (written as real PNG/CSV, NIfTI or pyramidal TIFF files on
    first use); `slides`: n slides of `size` x `size` pixels at 0.5 um/px."""

    kind: Literal["cls2d", "seg2d", "cls3d", "seg3d", "slides"]
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


class LabelEfficiency(_Frozen):
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


class Dataset(_Frozen):
    """One dataset of the manifest: where its files are, how to read them, its task."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
    format: Format
    path: Path
    index: str | GlobIndex | None = None  # CSV inside `path`, or a GlobIndex
    task: Task
    dims: Literal[2, 3]
    modality: str = ""
    intensity: Intensity = Intensity()
    splits: Splits | None = None  # None: from the data (CSV `split` column, npz keys)
    slice_axis: Literal["axial", "coronal", "sagittal"] = "axial"
    classes: tuple[str, ...] | None = Field(default=None, min_length=1)  # index = label id
    fit: Fit = "resize"
    fill_outlines: bool = False  # masks given as closed outlines: fill them per slice
    metadata: dict[str, str] = {}  # index column -> coordinate name kept on `item`
    mask_map: dict[int, int] = {}  # mask value -> class id, e.g. {255: 1} for 0/255 masks
    resolutions: Resolutions | None = None  # overrides the top-level list for this set
    synthetic: Synthetic | None = None
    tiling: Tiling | None = None  # whole-slide images: required
    label_efficiency: LabelEfficiency | None = None  # `featstore probe`'s curve points

    @property
    def slides(self) -> bool:
        """Whether the samples are whole-slide images read as tiles."""
        return self.format == "wsi" or (
            self.synthetic is not None and self.synthetic.kind == "slides"
        )

    @property
    def bags(self) -> bool:
        """Whether a sample holds many items to pool: slices of a volume, tiles of a slide."""
        return self.dims == 3 or self.slides

    @model_validator(mode="before")
    @classmethod
    def _slide_defaults(cls, data: Any) -> Any:
        # Slides are 8-bit RGB: x / 255 unless the manifest maps intensities itself.
        slide = isinstance(data, dict) and (
            data.get("format") == "wsi"
            or (
                isinstance(data.get("synthetic"), dict)
                and data["synthetic"].get("kind") == "slides"
            )
        )
        if slide and "intensity" not in data:
            return {**data, "intensity": {"mode": "window", "center": 127.5, "width": 255}}
        return data

    @model_validator(mode="after")
    def _check(self) -> Dataset:
        bad = {k: v for k, v in self.mask_map.items() if not (0 <= k <= 255 and 0 <= v <= 255)}
        if bad:
            raise ValueError(f"mask_map values and class ids must be in 0..255; got {bad}")
        names = list(self.metadata.values())
        clash = sorted(
            {n for n in names if n in RESERVED or names.count(n) > 1 or not _COORD.match(n)}
        )
        if clash:
            raise ValueError(
                f"metadata coordinate names {clash} are reserved ({', '.join(sorted(RESERVED))}), "
                "repeated, or not a plain name (letters, digits, _.-); rename them, e.g. "
                "{site: site_id}"
            )
        if (self.format == "synthetic") != (self.synthetic is not None):
            raise ValueError(
                "format 'synthetic' goes with a `synthetic: {kind: cls2d|seg2d|cls3d|"
                "seg3d}` block, and that block with format 'synthetic' only"
            )
        if self.slides != (self.tiling is not None):
            raise ValueError(
                "whole-slide images (format 'wsi', synthetic kind 'slides') need a "
                "`tiling: {tile_mpp: 0.5, tile_size: 224}` block, and only they take one"
            )
        if self.slides and (self.dims != 2 or self.task == "segmentation"):
            raise ValueError("slides are classified from 2D tiles: set `dims: 2` and a label task")
        if self.format == "stack" and self.dims != 3:
            raise ValueError("format 'stack' holds one volume per sample: set `dims: 3`")
        if self.format in ("images", "nifti", "dicom", "wsi", "stack") and self.index is None:
            raise ValueError(
                f"format '{self.format}' needs `index: <file>.csv` (one row per sample)"
            )
        if self.format == "images" and self.dims != 2:
            raise ValueError("format 'images' holds 2D images: set `dims: 2`")
        if self.format in ("nifti", "dicom") and self.dims != 3:
            raise ValueError(f"format '{self.format}' holds volumes: set `dims: 3`")
        if (
            self.synthetic is not None
            and not self.slides
            and (self.synthetic.kind[-2:] == "3d") != (self.dims == 3)
        ):
            raise ValueError(
                f"synthetic kind '{self.synthetic.kind}' does not match dims {self.dims}"
            )
        return self


def _blocks(v: tuple[int, ...]) -> tuple[int, ...]:
    if not v or len(set(v)) != len(v) or max(v) >= 0 or min(v) < -64:
        raise ValueError(
            "patch_layers must be distinct negative block indices counted from the "
            "end, e.g. [-4, -3, -2, -1] (-1 = the last block)"
        )
    return tuple(sorted(v))


PatchLayers = Annotated[tuple[int, ...], AfterValidator(_blocks)]


class EncoderPreprocessing(_Frozen):
    """Preprocessing that replaces an encoder's own config (recorded in its feature sets)."""

    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    interpolation: Literal["bilinear", "bicubic"] | None = None

    def items(self) -> tuple[tuple[str, object], ...]:
        """The fields that are set, as (name, value) pairs in field order."""
        return tuple((k, v) for k, v in self.model_dump().items() if v is not None)


class Study(_Frozen):
    """A grid of encoders x resolutions over some datasets (all when `datasets` is empty)."""

    name: str
    datasets: tuple[str, ...] = ()
    encoders: tuple[str, ...]
    resolutions: Resolutions
    label_efficiency: LabelEfficiency | None = None  # for its datasets without their own


class Manifest(_Frozen):
    """The whole manifest: datasets, the encoder x resolution grid, storage settings."""

    # a folder, or an fsspec URL (s3://bucket/prefix, gs://...; file:// is a folder)
    cache: Path | str = Path(DEFAULT_CACHE)
    encoders: tuple[str, ...] = ("dinov3-vits16",)
    resolutions: Resolutions = (224,)
    dtype: Literal["float16", "float32"] = "float16"
    # CLS of the last N blocks (N > 1 adds a `layer` dim); ViT-7B has 40 blocks
    layers: int = Field(default=1, ge=1, le=64)
    patch: bool = True  # store patch tokens
    # Fewer bytes where the user chooses: patch tokens average-pooled k x k, and/or
    # stored as int8 with a per-item, per-channel scale (both part of a set's identity).
    # Blocks whose patch tokens to store: -1 the last (default), -4 the fourth from the
    # end, ...; several add a `patch_layer` dimension (dense heads read them all).
    patch_layers: PatchLayers = (-1,)
    patch_pool: int = Field(default=1, ge=1, le=16)
    quantize: Literal["none", "int8"] = "none"
    batch_size: int = Field(default=32, ge=1, le=MAX_BATCH_SIZE)
    # Items per storage chunk = unit of work and of resume, rounded up to whole batches
    # and capped at ~64 MB of patch tokens. Few large chunks read much faster.
    unit_items: int = Field(default=256, ge=1, le=1_000_000)
    # Compressor of cls/patch/mask chunks (every chunk also carries a crc32c checksum).
    # Features compress only ~1.1-1.3x; see benchmarks/codecs.py for speed and ratio.
    codec: Literal["none", "lz4", "zstd-1", "zstd-3"] = "lz4"
    # medmnist+: small images zero-padded (fit: pad) and kNN with k=11, Euclidean
    # distance, majority vote (Doerrich et al. 2024), beside the default probes.
    protocol: Literal["default", "medmnist+", "seed"] = "default"
    # The raw-pixel baseline run beside every encoder: `pixels` (16-px patches, as
    # the DINOv3 presets) or `pixels:<patch>`; null to leave it out.
    baseline: str | None = Field(default="pixels", pattern=r"^pixels(:\d+)?$")
    datasets: tuple[Dataset, ...]
    studies: tuple[Study, ...] = ()  # without studies: one grid, encoders x resolutions
    # Per encoder (as named in `encoders` or a study): mean/std/interpolation that
    # replace the model's own; part of the sets' identity, recorded in each of them.
    preprocessing: dict[str, EncoderPreprocessing] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique(self) -> Manifest:
        names = [d.name for d in self.datasets]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"dataset names must be unique; repeated: {dup}")
        for study in self.studies:
            unknown = sorted(set(study.datasets) - set(names))
            if unknown:
                raise ValueError(
                    f"study '{study.name}' names unknown datasets {unknown}; known: {names}"
                )
        used = {*self.encoders, *(e for s in self.studies for e in s.encoders)}
        stray = sorted(set(self.preprocessing) - used)
        if stray:
            raise ValueError(
                f"preprocessing names encoders {stray} that no grid uses; known: {sorted(used)}"
            )
        return self

    def dataset(self, name: str) -> Dataset:
        """The dataset called `name`; a `ManifestError` listing the known names otherwise."""
        for d in self.datasets:
            if d.name == name:
                return d
        raise ManifestError(
            f"no dataset named '{name}' in the manifest; "
            f"known: {', '.join(d.name for d in self.datasets)}"
        )

    def fit_for(self, ds: Dataset) -> Fit:
        """How `ds` is fitted to the input size (the medmnist+ protocol always pads)."""
        return "pad" if self.protocol == "medmnist+" else ds.fit

    def resolutions_for(self, ds: Dataset) -> tuple[int, ...]:
        """Input sizes for `ds`: its own `resolutions`, else the manifest's."""
        return self.resolutions if ds.resolutions is None else ds.resolutions

    def cells(self, baseline: bool = True) -> list[tuple[Dataset, str, int]]:
        """Every (dataset, encoder, resolution) to extract and probe, baseline included."""
        extra = [self.baseline] if baseline and self.baseline else []
        grids = [(s.datasets, s.encoders, s.resolutions) for s in self.studies] or [
            ((), self.encoders, ())
        ]
        out: dict[tuple[str, str, int], tuple[Dataset, str, int]] = {}
        for names, encoders, resolutions in grids:
            for ds in self.datasets:
                if names and ds.name not in names:
                    continue
                for enc in [*encoders, *extra]:
                    for res in resolutions or self.resolutions_for(ds):
                        out.setdefault((ds.name, enc, res), (ds, enc, res))
        return list(out.values())

    def select(
        self,
        datasets: Sequence[str] = (),
        encoders: Sequence[str] = (),
        resolutions: Sequence[int] = (),
        study: str | None = None,
    ) -> Manifest:
        """A copy with CLI overrides applied (flags win over the manifest).

        --encoder/--resolution define the grid themselves, replacing the studies;
        --resolution also replaces every dataset's own `resolutions`.
        """
        update: dict[str, Any] = {}
        if study is not None:
            chosen = [s for s in self.studies if s.name == study]
            if not chosen:
                raise ManifestError(
                    f"no study named '{study}'; known: "
                    f"{', '.join(s.name for s in self.studies) or '(none)'}"
                )
            update["studies"] = tuple(chosen)
        if encoders or resolutions:
            update["studies"] = ()
        try:
            _check_resolutions(tuple(resolutions) or self.resolutions)
        except ValueError:
            raise ManifestError(
                f"--resolution {list(resolutions)}: each size must be from "
                f"{MIN_RESOLUTION} to {MAX_RESOLUTION} (a multiple of the patch size), e.g. 224"
            ) from None
        chosen_ds = tuple(self.dataset(n) for n in datasets) if datasets else self.datasets
        if resolutions:
            chosen_ds = tuple(d.model_copy(update={"resolutions": None}) for d in chosen_ds)
        update["datasets"] = chosen_ds
        if encoders:
            update["encoders"] = tuple(encoders)
        if resolutions:
            update["resolutions"] = tuple(resolutions)
        return self.model_copy(update=update)


def _where(loc: tuple[Any, ...], raw: dict[str, Any]) -> str:
    """'dataset 'x', field 'intensity.mode'' from a pydantic error location."""
    if len(loc) >= 2 and loc[0] == "datasets" and isinstance(loc[1], int):
        items = raw.get("datasets")
        items = items if isinstance(items, list) else []  # (a YAML !!set validates too)
        name = (
            items[loc[1]].get("name", f"#{loc[1] + 1}")
            if loc[1] < len(items) and isinstance(items[loc[1]], dict)
            else f"#{loc[1] + 1}"
        )
        field = ".".join(str(p) for p in loc[2:] if not str(p).startswith("function-"))
        return f"dataset '{name}', field '{field or '(entry)'}'"
    return f"field '{'.'.join(str(p) for p in loc)}'"


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Manifest
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if ann is None:
            return []
        args = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type)]
        inner = [a for a in args if issubclass(a, BaseModel)]
        if not inner:
            return []
        model = inner[0]
    return [f.alias or n for n, f in model.model_fields.items()]


def _explain(err: ValidationError, raw: dict[str, Any], source: Path) -> ManifestError:
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not str(p).startswith(("function-", "tagged-union")))
        where = _where(loc, raw)
        if e["type"] == "extra_forbidden":
            known = _known_keys(loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            lines.append(f"{where}: unknown key; {hint}")
        elif e["type"] == "missing":
            lines.append(f"{where}: required but missing; add it (see README, 'The manifest')")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = repr(e.get("input"))
            got = got if len(got) <= 120 else got[:100] + " ..."
            lines.append(f"{where}: {msg} (got {got})")
    return ManifestError(f"{source}: invalid manifest\n  " + "\n  ".join(lines))


def _expand(text: str) -> str:
    """$VAR, ${VAR} and ${VAR:-default} from the environment."""
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: os.environ.get(m[1]) or m[2], text)
    return os.path.expandvars(text)


def path_exists(path: Path, file: bool = False) -> bool:
    """Path.exists/is_file, False for names the OS refuses (NUL bytes, over-long names)."""
    try:
        return path.is_file() if file else path.exists()
    except (OSError, ValueError):
        return False


def load_manifest(
    path: str | os.PathLike[str],
    cache: str | os.PathLike[str] | None = None,
    *,
    need_data: bool = True,
) -> Manifest:
    """Parse and validate a manifest; relative paths resolve against its folder.

    The cache folder is, in order: `cache` (the --cache flag), $FEATSTORE_CACHE,
    the manifest's `cache:` key, `cache/features`. need_data False (probe, report,
    `open_features`): a dataset whose `path` is absent is accepted, since its feature
    sets hold what those need.
    """
    source = Path(path)
    if not path_exists(source, file=True):
        raise ManifestError(f"manifest not found: {source}; pass --manifest PATH to a YAML file")
    raw = parse_yaml(source) or {}
    if not isinstance(raw, dict) or "datasets" not in raw:
        raise ManifestError(f"{source}: expected a mapping with a `datasets:` list (see README)")
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise _explain(exc, raw, source) from None
    root = source.resolve().parent
    chosen = cache or os.environ.get("FEATSTORE_CACHE") or manifest.cache
    datasets = []
    for d in manifest.datasets:
        p = Path(_expand(str(d.path)))
        p = p if p.is_absolute() else root / p
        if not need_data and not path_exists(p):
            datasets.append(d.model_copy(update={"path": p}))
            continue
        if d.synthetic is None and not path_exists(p):
            raise ManifestError(
                f"{source}: dataset '{d.name}', field 'path': {p} does not exist; "
                "fix the path (relative paths resolve against the manifest's folder)"
            )
        update: dict[str, Any] = {"path": p}
        if isinstance(d.index, str) and d.synthetic is None and not path_exists(p / d.index, True):
            # an index kept beside the manifest, for data in a read-only folder
            beside = root / _expand(d.index)
            if not path_exists(beside, True):
                raise ManifestError(
                    f"{source}: dataset '{d.name}', field 'index': {p / d.index} does not "
                    f"exist (nor {beside}); give a CSV inside `path`, or beside the manifest, "
                    "with one row per sample"
                )
            update["index"] = str(beside)
        datasets.append(d.model_copy(update=update))
    where = place(chosen)
    if isinstance(where, Path) and not where.is_absolute():
        where = (root if chosen == manifest.cache else Path.cwd()) / where
    cache_path = where if isinstance(where, Path) else str(where)  # a URL stays a string
    return manifest.model_copy(update={"datasets": tuple(datasets), "cache": cache_path})
