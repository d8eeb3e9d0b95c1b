"""The encoder protocol every backend implements: resolve, info, load, encode.

A backend module (hf, timm_models, open_clip_models, pixels) turns its part of an
encoder spec into a `Resolved`: the `EncoderInfo` (identity and preprocessing),
derived from config files and weight hashes without building the model, and a
`build` function that makes the `Backbone` (the model and its token read-out). The
`Encoder` builds it only when a batch must be computed, so a fully cached extract
never loads a model; torch itself is imported only there (and where the device is
resolved), and what only timm or open_clip can tell is remembered (`derived`).

    info     what identifies the features: backend and its major version, the
             architecture config's hash, the weights' hash, patch size, skipped
             tokens, hidden size, mean/std and interpolation (identity.EncoderInfo)
    load()   build the model (once) and move it to the device
    encode() (B, 3, H, W) normalised pixels -> FeatureBatch (cls, patch)
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from featstore.data.fingerprint import files_sha256
from featstore.encode.weights import check_weights
from featstore.errors import EncoderConfigError, EncoderNotFoundError
from featstore.identity import EncoderInfo

if TYPE_CHECKING:  # torch is imported where a model is built or run, never to resolve
    import torch

Device = Literal["auto", "cpu", "cuda"]
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the DINOv2/v3 web-image (LVD) statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 0
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")


@dataclass(frozen=True)
class FeatureBatch:
    """One forward pass. Shapes never depend on options.

    cls:   (B, L, D) float32, final-norm CLS (or pooled) token of the last L blocks.
    patch: (B, P, rows, cols, D) float32, final-norm patch tokens of P chosen blocks,
           register and other prefix tokens removed.
    """

    cls: torch.Tensor
    patch: torch.Tensor


class Backbone(ABC):
    """A built model and how to read its tokens; `module` is what moves to the device."""

    module: torch.nn.Module
    autocast: bool = True  # bf16 on CUDA; False for read-outs that must stay float32

    @abstractmethod
    def tokens(
        self, pixels: torch.Tensor, layers: int, patch_layers: tuple[int, ...]
    ) -> FeatureBatch:
        """(B, 3, H, W) on the module's device -> cls (B, L, D), patch (B, P, h, w, D)."""


@dataclass(frozen=True)
class Resolved:
    """An encoder known by its files: its info now, its model on demand."""

    info: EncoderInfo
    build: Callable[[], Backbone]


class Encoder:
    """A frozen encoder in eval mode; the model is built on the first `encode`."""

    def __init__(self, resolved: Resolved, device: Device = "auto") -> None:
        self.asked: Device = device
        self.info = resolved.info
        self._build = resolved.build
        self._backbone: Backbone | None = None
        self._device: torch.device | None = None

    @property
    def device(self) -> torch.device:
        """Where the model runs; resolving `auto` imports torch, so only a run that
        computes (or records how it computes) asks."""
        if self._device is None:
            import torch

            asked = self.asked
            if asked == "auto":
                asked = "cuda" if torch.cuda.is_available() else "cpu"
            self._device = torch.device(asked)
        return self._device

    @property
    def patch_size(self) -> int:
        """Side of a square patch in pixels (from the model's config)."""
        return self.info.patch_size

    @property
    def loaded(self) -> bool:
        """Whether the model has been built (a cached extract never builds it)."""
        return self._backbone is not None

    def load(self) -> Backbone:
        """Build the model (once), in eval mode on the encoder's device."""
        if self._backbone is None:
            backbone = self._build()
            backbone.module.eval().to(self.device)
            self._backbone = backbone
        return self._backbone

    @property
    def model(self) -> torch.nn.Module:
        """The built model (built now if it was not)."""
        return self.load().module

    def encode(
        self, pixels: torch.Tensor, layers: int = 1, patch_layers: tuple[int, ...] = (-1,)
    ) -> FeatureBatch:
        """Forward one batch through the frozen model.

        Args:
            pixels: (B, 3, H, W) float32 normalised, H and W multiples of the patch size.
            layers: how many of the last blocks give a CLS token (L).
            patch_layers: blocks whose patch tokens to return (P of them): -1 the last,
                -2 the one before, ...; each through the model's final norm.
        Returns:
            cls (B, L, D) float32 and patch (B, P, H/p, W/p, D) float32, on the encoder's
            device (the caller casts and copies them to the host, off the critical path).
        """
        import torch

        _, _, h, w = pixels.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {p}")
        backbone = self.load()
        pixels = pixels.to(self.device, non_blocking=True)
        cuda = self.device.type == "cuda" and backbone.autocast
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
        with torch.inference_mode():
            with autocast:
                out = backbone.tokens(pixels, layers, patch_layers)
            return FeatureBatch(cls=out.cls.float(), patch=out.patch.float())


def check_depth(name: str, depth: int, layers: int, patch_layers: tuple[int, ...]) -> None:
    """Refuse `layers`/`patch_layers` that reach beyond the model's `depth` blocks."""
    deepest = max([layers, *(abs(i) for i in patch_layers)])
    if deepest > depth:
        raise ValueError(
            f"patch_layers {list(patch_layers)} / layers {layers} reach beyond the {depth} "
            f"blocks of '{name}'"
        )


def grid(tokens: torch.Tensor, h: int, w: int, p: int) -> torch.Tensor:
    """(B, N, D) patch tokens in row order -> (B, h/p, w/p, D)."""
    return tokens.reshape(tokens.shape[0], h // p, w // p, tokens.shape[-1])


def major_version(package: str) -> str:
    """'transformers 5': a backend's name and major version (no import of it)."""
    return f"{package} {version(package).split('.')[0]}"


def torch_version() -> str:
    """`torch.__version__` (local tag included, e.g. '2.14.1+cu130'; the package
    metadata has no tag), read from torch/version.py while torch is not imported."""
    if "torch" in sys.modules:
        return str(sys.modules["torch"].__version__)
    spec = importlib.util.find_spec("torch")
    path = Path(spec.origin).with_name("version.py") if spec and spec.origin else None
    for node in ast.parse(path.read_text()).body if path and path.is_file() else []:
        if (
            isinstance(node, ast.Assign)
            and [getattr(t, "id", None) for t in node.targets] == ["__version__"]
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            return node.value.value
    import torch  # a layout this parser does not know: ask torch itself

    return str(torch.__version__)


def random_init_sha256(config_sha256: str, package: str) -> str:
    """The 'weights' hash of a fixed-seed random init: its architecture, the seed and
    the exact versions of the code that draws it (torch and the backend)."""
    tag = f"random-init|seed={RANDOM_SEED}|{config_sha256}|{package}=={version(package)}"
    return hashlib.sha256(f"{tag}|torch=={torch_version()}".encode()).hexdigest()


def seeded(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """`build()` under the fixed seed, leaving the caller's random state untouched."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        return build()


def json_sha256(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys, tuples as lists)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or an EncoderConfigError naming the file."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EncoderConfigError(
            f"{path}: not readable JSON ({exc}); restore the file from the model's source"
        ) from None
    if not isinstance(data, dict):
        raise EncoderConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def no_random_flag(spec: str, flag: str) -> None:
    """Refuse ':random' on a folder or a hub id: they name weights, not an architecture
    (a random init is asked for by a model or preset name)."""
    if flag:
        raise EncoderNotFoundError(
            f"encoder '{spec}:{flag}': ':random' applies to a model or preset name, not to a "
            "folder or hub id, whose weights are what it names; drop ':random', or name the "
            "architecture (e.g. 'timm:vit_small_patch16_224:random', 'dinov3-vits16:random')"
        )


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder, sorted (safetensors, bin, pth), each checked
    by its header (`weights.check_weights`): a damaged one is refused here, at resolve."""
    files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    check_weights(files)
    return files


def files_digest(files: list[Path], memo: Path | None) -> str:
    """One sha256 over the contents of `files` (memoised per file in `memo`)."""
    digests = files_sha256(files, memo)
    return hashlib.sha256("".join(digests[str(p)] for p in files).encode()).hexdigest()


def allow_download() -> bool:
    """Downloads only when asked (FEATSTORE_ALLOW_DOWNLOAD=1) and not HF_HUB_OFFLINE."""
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    return not offline and os.environ.get("FEATSTORE_ALLOW_DOWNLOAD") == "1"


def hub_folder(repo_id: str) -> Path | None:
    """The local snapshot of a hub repository (from the cache), or None."""
    from huggingface_hub import constants

    offline = not allow_download()
    cached = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    if offline and not cached.is_dir():  # the cache's layout: nothing of it is here
        return None  # without importing the hub client (0.3 s)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=offline))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None


def three(values: Any, where: str) -> tuple[float, ...]:
    """Mean or std as 3 floats (one number is broadcast to the 3 channels)."""
    if isinstance(values, int | float):
        values = [values]
    if not isinstance(values, list | tuple) or len(values) not in (1, 3):
        raise EncoderConfigError(f"{where}: expected 1 or 3 numbers, found {values!r}")
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise EncoderConfigError(f"{where}: expected numbers, found {values!r}") from None
    return out * 3 if len(out) == 1 else out
