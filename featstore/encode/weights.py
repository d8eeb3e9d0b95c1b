"""Weight files checked before a model is built, and read with one kind of error.

A weights file that is truncated (an interrupted copy), foreign (an HTML error page
saved under the weights' name) or empty would otherwise surface as a library's own
exception (safetensors' `SafetensorError`, pickle's `UnpicklingError`, a zip error
from `torch.load`) in the middle of a run. Here:

- `check_weights` reads only each file's header, without torch, when an encoder is
  resolved, so a damaged file is refused before anything is extracted:
  safetensors: the 8-byte header length, the JSON header, and its tensors' byte
  ranges against the file's size; `.bin` / `.pth`: torch's zip layout (whose central
  directory is at the end, so a truncated file fails) or a legacy pickle's first byte.
- `read_state` loads a state dict (safetensors, or `torch.load(weights_only=True)`)
  and turns every failure into an `EncoderConfigError` naming the file.
"""

from __future__ import annotations

import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

from featstore.errors import EncoderConfigError

# A safetensors header is a JSON table of tensor names, dtypes, shapes and offsets: a
# few MB for the largest models. A larger length means the file is not safetensors.
MAX_HEADER = 100 << 20
PICKLE_PROTO = 0x80  # the first byte of a legacy (pre zip) torch.save pickle
FIX = "download it again or restore it from the model's source"


def _damaged(path: Path, what: str) -> EncoderConfigError:
    return EncoderConfigError(f"{path}: not a readable weights file ({what}); {FIX}")


def _check_safetensors(path: Path) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _damaged(path, f"{size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= min(MAX_HEADER, size - 8):
            raise _damaged(path, f"header length {n} does not fit a file of {size} bytes")
        try:
            table = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _damaged(path, "its header is not JSON: not a safetensors file") from None
    if not isinstance(table, dict):
        raise _damaged(path, "its header is not a table of tensors")
    try:
        ends = [int(v["data_offsets"][1]) for k, v in table.items() if k != "__metadata__"]
    except (TypeError, KeyError, IndexError, ValueError):
        raise _damaged(path, "its header lists tensors without byte ranges") from None
    data = size - 8 - n
    if max(ends, default=0) != data:
        raise _damaged(
            path, f"its tensors need {max(ends, default=0)} data bytes, the file holds {data}"
        )


def _check_torch(path: Path) -> None:
    with path.open("rb") as f:
        first = f.read(1)
    if zipfile.is_zipfile(path):
        return
    if first and first[0] == PICKLE_PROTO:  # legacy format: checked when it is read
        return
    raise _damaged(path, "neither torch's zip format nor a pickle: truncated or foreign")


def check_weights(files: list[Path]) -> None:
    """Refuse a damaged weights file by its header (see the module docstring)."""
    for path in files:
        try:
            if path.suffix == ".safetensors":
                _check_safetensors(path)
            else:
                _check_torch(path)
        except OSError as exc:
            raise _damaged(path, str(exc)) from None


def read_state(path: Path) -> dict[str, Any]:
    """The table of a weights file, name -> tensor (safetensors, or a torch pickle
    loaded with `weights_only=True`, which may nest it, e.g. under "model"); an
    `EncoderConfigError` naming the file on any failure."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, SafetensorError) as exc:
        raise _damaged(path, str(exc).strip()[:300]) from None
    except pickle.UnpicklingError as exc:
        raise _damaged(
            path, f"not a plain tensor pickle: {str(exc).splitlines()[0][:200]}"
        ) from None
    if not isinstance(state, dict):
        raise _damaged(path, f"it holds a {type(state).__name__}, not a table of tensors")
    return state
