"""The data manifest: datasets, the encoder x resolution grid, validation with errors
that name the field.

The manifest is parsed once into frozen pydantic models; nothing downstream mutates
them. A typo is a `ManifestError` naming the dataset, the field and the fix. The
nested blocks (intensity, splits, tiling, ...) live in `featstore.data.settings`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from featstore.data.evaluations import ExternalTest, check_evaluations
from featstore.data.explain import explain
from featstore.data.safe_yaml import parse_yaml
from featstore.data.settings import (
    FORMATS,
    MAX_RESOLUTION,
    MIN_RESOLUTION,
    VOLUME_FORMATS,
    Channels,
    EncoderPreprocessing,
    Format,
    Frozen,
    GlobIndex,
    Instances,
    Intensity,
    LabelEfficiency,
    PatchLayers,
    Resolutions,
    Splits,
    Synthetic,
    Tiling,
    Volume,
    check_resolutions,
)
from featstore.errors import ManifestError
from featstore.places import place

Task = Literal["classification", "multilabel", "segmentation"]
Fit = Literal["resize", "pad"]  # pad: small images centred on a zero canvas
SPLITS = ("train", "val", "test")
DEFAULT_CACHE = "cache/features"
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


class Dataset(Frozen):
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
    metadata: dict[str, str] = Field(
        default_factory=dict
    )  # index column -> coordinate name kept on `item`
    mask_map: dict[int, int] = Field(
        default_factory=dict
    )  # mask value -> class id, e.g. {255: 1} for 0/255 masks
    resolutions: Resolutions | None = None  # overrides the top-level list for this set
    synthetic: Synthetic | None = None
    tiling: Tiling | None = None  # whole-slide images: required
    volume: Volume | None = None  # format hdf5 / zarr: required (arrays by internal path)
    channels: Channels | None = None  # several co-registered images per sample (NIfTI)
    label_efficiency: LabelEfficiency | None = None  # `featstore probe`'s curve points
    # neurons (EM): the boundary class scored as instances too; `true` = {labels: membrane}
    instances: Instances | None = None
    # index rows may name files outside `path` (absolute, `../`, symlinks out of it)
    allow_outside_paths: bool = False

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
            data = {**data, "intensity": {"mode": "window", "center": 127.5, "width": 255}}
        if isinstance(data, dict) and isinstance(data.get("instances"), bool):
            data = {**data, "instances": {} if data["instances"] else None}
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
        self._check_volume()
        self._check_channels()
        self._check_instances()
        rules = FORMATS[self.format]
        if self.dims not in rules.dims:
            want = " or ".join(map(str, rules.dims))
            raise ValueError(f"format '{self.format}' holds {rules.holds}: set `dims: {want}`")
        if rules.index and self.index is None:
            raise ValueError(
                f"format '{self.format}' needs `index: <file>.csv` (one row per sample)"
            )
        if (
            self.synthetic is not None
            and not self.slides
            and (self.synthetic.kind[-2:] == "3d") != (self.dims == 3)
        ):
            raise ValueError(
                f"synthetic kind '{self.synthetic.kind}' does not match dims {self.dims}"
            )
        return self

    def _check_channels(self) -> None:
        if self.channels is None:
            return
        petct = self.synthetic is not None and self.synthetic.kind == "petct3d"
        if self.format != "nifti" and not petct:
            raise ValueError(
                f"`channels:` reads several co-registered NIfTI images per sample; format "
                f"'{self.format}' holds one image per sample (use format nifti)"
            )
        if petct and self.channels.sequences:
            raise ValueError(
                "synthetic kind 'petct3d' writes CT and PET as index columns: name them "
                "as sources (`source: ct`, `source: pet`), not sequence indices"
            )
        # (compared with the default, not `model_fields_set`: a dumped manifest, as
        # run-config.json keeps it, lists every field)
        if self.intensity != Intensity():
            raise ValueError(
                "with `channels:` each input has its own `intensity:`; drop the "
                "dataset's `intensity:` and give one per input"
            )

    def _check_instances(self) -> None:
        if self.instances is None:
            return
        if self.task != "segmentation":
            raise ValueError(
                "`instances:` scores neuron instances of a segmentation dataset; set "
                "`task: segmentation`, or leave `instances` out"
            )
        if self.classes is None or len(self.classes) != 2:
            raise ValueError(
                "a dataset with `instances:` has two classes, the neurons' interior (0) "
                "and their boundary (1): set e.g. `classes: [interior, membrane]`"
            )
        if self.instances.labels == "ids" and (self.mask_map or self.fill_outlines):
            raise ValueError(
                "`instances: {labels: ids}` reads neuron ids, which become boundaries as "
                "they are; leave out `mask_map` and `fill_outlines` (they map class ids)"
            )

    def _check_volume(self) -> None:
        if (self.format in VOLUME_FORMATS) != (self.volume is not None):
            raise ValueError(
                "formats 'hdf5' and 'zarr' go with a `volume: {raw: volumes/raw}` block "
                "(internal paths of the arrays), and that block with those formats only"
            )
        if self.volume is None:
            return
        if (self.task == "segmentation") != (self.volume.labels is not None):
            raise ValueError(
                "a segmentation dataset of format hdf5/zarr names its label array, "
                "`volume: {raw: volumes/raw, labels: volumes/labels/clefts}`, and only "
                "segmentation datasets take `labels` (classification labels come from the "
                "index's `label` column)"
            )
        if self.intensity.mode == "percentile":
            raise ValueError(
                f"format '{self.format}' reads a volume slice run by slice run, never whole, "
                "so its percentiles are not computed; use `intensity: {mode: minmax}` (the "
                "volume's min and max, found block by block) or a fixed window"
            )


class Study(Frozen):
    """A grid of encoders x resolutions over some datasets (all when `datasets` is empty)."""

    name: str
    datasets: tuple[str, ...] = ()
    encoders: tuple[str, ...]
    resolutions: Resolutions
    label_efficiency: LabelEfficiency | None = None  # for its datasets without their own


@dataclass(frozen=True)
class Cell:
    """One dataset x encoder x resolution of a manifest: one feature set, scored once."""

    dataset: Dataset
    encoder: str  # the encoder's spec, as the manifest (or a flag) gives it
    resolution: int


class Manifest(Frozen):
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
    # Items per storage chunk (the granule of a read and of a checksum), rounded up to
    # whole batches and capped at ~64 MB of patch tokens. Few large chunks read faster.
    unit_items: int = Field(default=256, ge=1, le=1_000_000)
    # The most units of work (= zarr shards, one object per array each) a set is cut
    # into: a larger set gets units of more chunks (up to ~128 MB of its largest array
    # per unit), so a set of millions of items stays a few thousand objects.
    max_units: int = Field(default=256, ge=1, le=1_000_000)
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
    # probes trained on one dataset and tested on another (`featstore.data.evaluations`)
    evaluations: tuple[ExternalTest, ...] = ()

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
        check_evaluations(self.datasets, self.evaluations)
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

    def cells(self, baseline: bool = True) -> list[Cell]:
        """Every cell (dataset x encoder x resolution) to extract and probe, baseline
        included, each once, in the grids' order."""
        extra = [self.baseline] if baseline and self.baseline else []
        grids = [(s.datasets, s.encoders, s.resolutions) for s in self.studies] or [
            ((), self.encoders, ())
        ]
        out: dict[tuple[str, str, int], Cell] = {}
        for names, encoders, resolutions in grids:
            for ds in self.datasets:
                if names and ds.name not in names:
                    continue
                for enc in [*encoders, *extra]:
                    for res in resolutions or self.resolutions_for(ds):
                        out.setdefault((ds.name, enc, res), Cell(ds, enc, res))
        return list(out.values())

    def select(
        self,
        datasets: Sequence[str] = (),
        encoders: Sequence[str] = (),
        resolutions: Sequence[int] = (),
        study: str | None = None,
    ) -> Manifest:
        """A copy with CLI overrides applied (flags win over the manifest).

        Without `study`, --encoder/--resolution define the grid themselves, replacing
        the studies. With `study`, they replace that study's encoders/resolutions and
        keep the rest of it (its datasets). --resolution also replaces every dataset's
        own `resolutions`.
        """
        update: dict[str, Any] = {}
        if study is not None:
            chosen = [s for s in self.studies if s.name == study]
            if not chosen:
                raise ManifestError(
                    f"no study named '{study}'; known: "
                    f"{', '.join(s.name for s in self.studies) or '(none)'}"
                )
            narrowed: dict[str, Any] = {}
            if encoders:
                narrowed["encoders"] = tuple(encoders)
            if resolutions:
                narrowed["resolutions"] = tuple(resolutions)
            update["studies"] = (chosen[0].model_copy(update=narrowed),)
        elif encoders or resolutions:
            update["studies"] = ()
        try:
            check_resolutions(tuple(resolutions) or self.resolutions)
        except ValueError:
            raise ManifestError(
                f"--resolution {list(resolutions)}: each size must be from "
                f"{MIN_RESOLUTION} to {MAX_RESOLUTION} (a multiple of the patch size), e.g. 224"
            ) from None
        chosen_ds = tuple(self.dataset(n) for n in datasets) if datasets else self.datasets
        grid = update.get("studies", self.studies)
        if (
            study is not None
            and grid[0].datasets
            and not set(grid[0].datasets) & set(datasets or grid[0].datasets)
        ):
            raise ManifestError(
                f"study '{study}' covers {list(grid[0].datasets)}, not {list(datasets)}; "
                "pick one of those with --dataset, or leave --study out"
            )
        if resolutions:
            chosen_ds = tuple(d.model_copy(update={"resolutions": None}) for d in chosen_ds)
        update["datasets"] = chosen_ds
        kept = {d.name for d in chosen_ds}  # an evaluation needs both of its datasets
        update["evaluations"] = tuple(
            e for e in self.evaluations if e.train in kept and e.test in kept
        )
        if encoders:
            update["encoders"] = tuple(encoders)
        if resolutions:
            update["resolutions"] = tuple(resolutions)
        return self.model_copy(update=update)


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
        raise ManifestError(
            f"{source}: expected a mapping with a `datasets:` list (see docs/manifest.md)"
        )
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        raise explain(exc, raw, source, Manifest) from None
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
