"""What a feature set is: one frozen identity from which its request and its key derive.

A feature set is determined by the dataset's content, the preprocessing, the encoder's
weights and what is stored (layers, dtype, patch tokens). `Recipe` holds everything
of that which the manifest decides, known without loading an encoder; `SetIdentity`
adds the encoder, first as asked (the spec) and, once loaded, as weights:

    request()  recipe + encoder spec     torch-free: how probe finds a set
    content()  recipe + encoder weights  hashed into the cache key (folder name)

Both views embed `Recipe.to_dict()` whole, so no setting can reach one and not the
other. Nothing else lists these fields.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from featstore.data.manifest import Dataset, Fit, Manifest
from featstore.data.settings import FORMATS, Channels, Intensity, Interpolation
from featstore.data.tissue import PLAN_VERSION

# 2: the identity object (recipe + encoder content) replaced the hand-kept config.
# 3: what the probes need from the raw data is in the set (native size and spacing per
#    item, example thumbnails), so a set is probed where its data is not; and the
#    encoder's backend, its major version, architecture config and interpolation
#    joined the key (sets of format 2 are refused with the advice to re-extract).
# 4: every array on `item` is a zarr v3 shard per unit of work (of `shard_chunks`
#    chunks, each with its crc32c), and units grow with the set (the manifest's
#    `max_units`), so a set of millions of items is a few thousand objects.
FORMAT_VERSION = 4


@dataclass(frozen=True)
class Preprocess:
    """Everything that maps a raw sample to encoder input; recorded in every feature set."""

    resolution: int
    intensity: Intensity
    mean: tuple[float, ...]  # per channel; broadcast over the 3 input channels
    std: tuple[float, ...]
    fit: Fit = "resize"  # pad: centre small images on a zero canvas
    interpolation: Interpolation = "bilinear"  # the encoder's own resize filter
    # several co-registered images per sample, each input with its own intensity
    # (`intensity` is then unused); None: one image per sample
    channels: Channels | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, as stored in a feature set's `preprocess` attribute."""
        d = asdict(self)
        d["intensity"] = self.intensity.model_dump()
        if self.channels is None:
            del d["channels"]
        else:
            d["channels"] = self.channels.model_dump()
        return d


@dataclass(frozen=True)
class EncoderInfo:
    """What identifies an encoder's features; stored in every feature set and result."""

    name: str
    source: str  # folder, hub id@revision, or "random-init(seed=0)"
    weights_sha256: str
    model_type: str
    patch_size: int
    num_register_tokens: int
    hidden_size: int
    mean: tuple[float, ...]  # per input channel (3: RGB), from the model's own config
    std: tuple[float, ...]
    random_init: bool
    backend: str = "hf"  # hf | timm | open_clip | pixels
    backend_version: str = ""  # "transformers 5": the loader's name and major version
    config_sha256: str = ""  # the architecture config (config.json, timm/open_clip cfg)
    interpolation: Interpolation = "bilinear"  # resize filter the model was trained with
    cls_token: str = "cls"  # what `cls` holds: the "cls" token, or the "pooled" token

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, one key per field (as stored in a feature set's attributes)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderInfo:
        """The inverse of `to_dict` (JSON lists back to tuples)."""
        tuples: dict[str, tuple[Any, ...]] = {k: tuple(d[k]) for k in ("mean", "std")}
        return cls(**{**d, **tuples})

    @property
    def label(self) -> str:
        """The name for people: flagged when the weights are a random init."""
        return labelled(self.name, self.random_init)


def labelled(name: str, random_init: bool) -> str:
    """An encoder's name wherever people read it (logs, `ls`, tables, legends), flagged
    when its weights are a random init: the one spelling of that flag."""
    return name + (" [random_init]" if random_init else "")


# Fields of EncoderInfo that determine the features; name and source are labels only
# (a moved model folder keeps its sets).
ENCODER_CONTENT = (
    "model_type",
    "weights_sha256",
    "random_init",
    "patch_size",
    "num_register_tokens",
    "hidden_size",
    "mean",
    "std",
    "backend",
    "backend_version",
    "config_sha256",
    "interpolation",
    "cls_token",
)


@dataclass(frozen=True)
class Recipe:
    """Everything the manifest decides about a feature set's bytes."""

    dataset: str  # fingerprint: file contents, labels, split assignment
    task: str
    dims: int
    slice_axis: str
    fill_outlines: bool
    mask_map: tuple[tuple[int, int], ...]
    metadata: tuple[tuple[str, str], ...]  # index column -> coordinate name
    resolution: int
    intensity: Intensity
    fit: Fit
    layers: int
    dtype: str
    patch: bool
    patch_layers: tuple[int, ...] = (-1,)  # blocks whose patch tokens are stored
    patch_pool: int = 1  # patch tokens average-pooled k x k
    quantize: str = "none"  # "int8": patch tokens as int8 x per-channel scale
    # the manifest's replacements of the encoder's own mean/std/interpolation
    preprocessing: tuple[tuple[str, Any], ...] = ()
    # slides: the tiling plan (manifest `tiling:` and the plan's version); left out of
    # both views when None, so that the keys of sets without slides did not change
    tiling: tuple[tuple[str, Any], ...] | None = None
    # the version of the pixel rules its format decodes by (images, stack, wsi:
    # featstore.data.layouts; dicom: its photometric rules); left out of both views
    # when None (other formats)
    decode: int | None = None
    # `channels:` (sources, per-input intensity, rgb or per-channel and its combine);
    # left out of both views when None, so that single-image sets keep their keys
    channels: Channels | None = None
    # `instances: {labels: ...}` (membrane | ids): what the stored mask's class 1 is;
    # left out of both views when None (datasets without instances)
    instances: str | None = None

    @classmethod
    def of(cls, ds: Dataset, manifest: Manifest, fingerprint: str, resolution: int) -> Recipe:
        """The recipe of one manifest cell; `fingerprint` is the dataset's content hash."""
        return cls(
            dataset=fingerprint,
            task=ds.task,
            dims=ds.dims,
            slice_axis=ds.slice_axis,
            fill_outlines=ds.fill_outlines,
            mask_map=tuple(sorted(ds.mask_map.items())),
            metadata=tuple(sorted(ds.metadata.items())),
            resolution=resolution,
            intensity=ds.intensity,
            fit=manifest.fit_for(ds),
            layers=manifest.layers,
            dtype=manifest.dtype,
            patch=manifest.patch,
            patch_layers=manifest.patch_layers,
            patch_pool=manifest.patch_pool,
            quantize=manifest.quantize,
            tiling=None
            if ds.tiling is None
            else tuple(sorted({**ds.tiling.model_dump(), "plan": PLAN_VERSION}.items())),
            decode=FORMATS[ds.format].decode,
            channels=ds.channels,
            instances=None if ds.instances is None else ds.instances.labels,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, one key per field."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["intensity"] = self.intensity.model_dump()
        out["mask_map"] = [list(p) for p in self.mask_map]
        out["metadata"] = [list(p) for p in self.metadata]
        out["patch_layers"] = list(self.patch_layers)
        out["preprocessing"] = [list(p) for p in self.preprocessing]
        if self.tiling is None:
            del out["tiling"]
        else:
            out["tiling"] = dict(self.tiling)
        for name in ("decode", "instances"):
            if out[name] is None:
                del out[name]
        if self.channels is None:
            del out["channels"]
        else:
            out["channels"] = self.channels.model_dump()
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Recipe:
        """The inverse of `to_dict`."""
        return cls(
            **{
                **d,
                "intensity": Intensity(**d["intensity"]),
                "mask_map": tuple((int(k), int(v)) for k, v in d["mask_map"]),
                "metadata": tuple((str(k), str(v)) for k, v in d["metadata"]),
                "patch_layers": tuple(d.get("patch_layers", (-1,))),
                "preprocessing": tuple(
                    (str(k), tuple(v) if isinstance(v, list) else v)
                    for k, v in d.get("preprocessing", ())
                ),
                "tiling": tuple(sorted(d["tiling"].items())) if d.get("tiling") else None,
                "channels": Channels(**d["channels"]) if d.get("channels") else None,
            }
        )


def short(digest: str) -> str:
    """A sha256 hex digest (a set's key, a weights hash) as people read it: tables,
    result rows (`feature_set`), `ls`, messages. The one place it is cut."""
    return digest[:12]


def folder_name(key: str) -> str:
    """The folder of the feature set whose cache key is `key`."""
    return f"{key[:24]}.zarr"


def canonical(obj: Any) -> Any:
    """The JSON form of `obj` (tuples as lists), as stored in attributes."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


@dataclass(frozen=True)
class SetIdentity:
    """One feature set's identity: the recipe and the encoder (spec, then weights)."""

    recipe: Recipe
    encoder: str  # as asked: preset, folder, hub id, pixels[:p]
    weights: EncoderInfo | None = None  # known once the encoder is loaded

    def with_weights(self, info: EncoderInfo) -> SetIdentity:
        """A copy that knows the loaded encoder's weights (needed for `key` and `content`)."""
        return SetIdentity(self.recipe, self.encoder, info)

    def request(self) -> dict[str, Any]:
        """What a study asks for (no weights needed): probe finds sets by it."""
        return canonical(
            {"format": FORMAT_VERSION, "encoder": self.encoder, **self.recipe.to_dict()}
        )

    def content(self) -> dict[str, Any]:
        """Everything that determines the bytes; its hash is the cache key."""
        w = self._weights()
        encoder = {name: getattr(w, name) for name in ENCODER_CONTENT}
        return canonical({"format": FORMAT_VERSION, "encoder": encoder, **self.recipe.to_dict()})

    def key(self) -> str:
        """The cache key: sha256 hex digest of `content()`."""
        return hashlib.sha256(json.dumps(self.content(), sort_keys=True).encode()).hexdigest()

    def preprocess(self) -> Preprocess:
        """The preprocessing of this set: the encoder's own mean/std/interpolation, or the
        manifest's replacements of them."""
        w = self._weights()
        r = self.recipe
        own = Preprocess(
            r.resolution, r.intensity, w.mean, w.std, r.fit, w.interpolation, r.channels
        )
        return replace(own, **dict(r.preprocessing))

    def to_attrs(self) -> dict[str, Any]:
        """The whole identity, JSON-ready, for the set's `identity` attribute."""
        return canonical(
            {
                "recipe": self.recipe.to_dict(),
                "encoder": self.encoder,
                "weights": asdict(self._weights()),
            }
        )

    @classmethod
    def from_attrs(cls, d: dict[str, Any]) -> SetIdentity:
        """The inverse of `to_attrs`."""
        return cls(Recipe.from_dict(d["recipe"]), d["encoder"], EncoderInfo.from_dict(d["weights"]))

    def _weights(self) -> EncoderInfo:
        if self.weights is None:
            raise ValueError("the encoder is not loaded yet: call with_weights(encoder.info)")
        return self.weights


def changes(old: SetIdentity, new: SetIdentity) -> list[str]:
    """What made `new` another set than `old`, for people: "the manifest" (a setting of
    the recipe, or the encoder as asked), "the data" (its files' fingerprint), "the
    encoder's weights" (one or more; empty when the two are one set)."""
    out = []
    mine, theirs = old.recipe.to_dict(), new.recipe.to_dict()
    if without_data(mine) != without_data(theirs) or old.encoder != new.encoder:
        out.append("the manifest")
    if mine[DATA_FIELD] != theirs[DATA_FIELD]:
        out.append("the data")
    w, v = old.weights, new.weights
    if (
        w is not None
        and v is not None
        and any(getattr(w, f) != getattr(v, f) for f in ENCODER_CONTENT)
    ):
        out.append("the encoder's weights")
    return out


def without_data(request: dict[str, Any]) -> dict[str, Any]:
    """`request` less the data's fingerprint: what a probe can ask for where the data
    folder is absent (it cannot hash files it does not have)."""
    return {k: v for k, v in request.items() if k != DATA_FIELD}


# The field of `Recipe` (and so of every request) that hashes the dataset's files.
DATA_FIELD = "dataset"


def requested(
    ds: Dataset, manifest: Manifest, fingerprint: str, encoder: str, resolution: int
) -> SetIdentity:
    """The identity a manifest cell asks for, before any encoder is loaded."""
    recipe = Recipe.of(ds, manifest, fingerprint, resolution)
    own = manifest.preprocessing.get(encoder)
    if own is not None:
        recipe = replace(recipe, preprocessing=own.items())
    return SetIdentity(recipe, encoder)
