"""Damaged inputs to loading: weight files, memo files and the ':random' flag.

Every backend's weight files (transformers `model.safetensors` / `pytorch_model.bin`,
timm's `model.safetensors`, open_clip's `open_clip_*`), truncated, foreign or empty,
are refused when the encoder is resolved, by a featstore error naming the file; the
memo files beside a cache, valid JSON of the wrong shape, are derived again and give
the same identity as no memo; ':random' is honoured or refused, never ignored.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
from conftest import OPEN_CLIP_CFG, save_tiny_open_clip, save_tiny_timm, save_tiny_vit

from featstore.encode.encoders import load_encoder, resolve_encoder
from featstore.errors import EncoderConfigError, EncoderNotFoundError, FeatstoreError

DAMAGES = {
    "truncated": lambda b: b[: len(b) // 2],
    "foreign": lambda b: b"<html><body>404 Not Found</body></html>\n" * 8,
    "empty": lambda b: b"",
    "header-only": lambda b: b[:64],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, tuple[str, Path]]:
    """backend -> (spec prefix, folder) of a tiny model in its ecosystem's layout."""
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    root = tmp_path_factory.mktemp("models")
    hf = save_tiny_vit(DINOv3ViTConfig, DINOv3ViTModel, root / "hf", seed=1)
    timm = save_tiny_timm(root / "timm")
    save_tiny_open_clip(root / "clip", OPEN_CLIP_CFG)
    return {"hf": ("", hf), "timm": ("timm:", timm), "open_clip": ("open_clip:", root / "clip")}


def _as_bin(folder: Path) -> None:
    """The folder's safetensors weights re-saved as a torch pickle (`*.bin`)."""
    import torch
    from safetensors.torch import load_file

    (st,) = folder.glob("*.safetensors")
    torch.save(load_file(st), folder / st.name.replace("model.safetensors", "pytorch_model.bin"))
    st.unlink()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
@pytest.mark.parametrize("kind", ["safetensors", "bin"])
@pytest.mark.parametrize("backend", ["hf", "timm", "open_clip"])
def test_damaged_weights_are_refused_at_resolve_naming_the_file(
    models, tmp_path, backend, kind, damage
):
    prefix, src = models[backend]
    folder = shutil.copytree(src, tmp_path / backend)
    if kind == "bin":
        if backend == "timm":
            pytest.skip("timm's save_for_hf layout is model.safetensors only")
        _as_bin(folder)
    load_encoder(f"{prefix}{folder}", "cpu")  # the undamaged copy resolves
    (weights,) = (p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    weights.write_bytes(DAMAGES[damage](weights.read_bytes()))
    with pytest.raises(EncoderConfigError) as err:
        load_encoder(f"{prefix}{folder}", "cpu")
    assert str(weights) in str(err.value) and "restore it" in str(err.value)


def test_a_bin_that_unpickles_to_code_is_a_featstore_error_when_loaded(models, tmp_path):
    """A zip that torch.save wrote, but of an object `weights_only` refuses: passes the
    header check, and is refused by name when the model is built."""
    import torch

    folder = shutil.copytree(models["hf"][1], tmp_path / "hf")
    (folder / "model.safetensors").unlink()
    torch.save({"w": Path("x")}, folder / "pytorch_model.bin")
    from featstore.encode.weights import read_state

    with pytest.raises(EncoderConfigError, match=r"pytorch_model\.bin"):
        read_state(folder / "pytorch_model.bin")


def _wrong_shapes(memo: object) -> list[tuple[str, object]]:
    """The memo with, in turn, the whole file, each entry and each leaf value replaced
    by values of other types (valid JSON throughout; a value of its own type, a string
    for a string, is a memo's content, not its shape)."""
    out: list[tuple[str, object]] = [(f"file={v!r}", v) for v in ([], "x", 5, None)]
    if not isinstance(memo, dict):
        return out

    def leaves(obj: object, path: tuple) -> list[tuple]:
        if isinstance(obj, dict):
            return [p for k, v in obj.items() for p in [(*path, k), *leaves(v, (*path, k))]]
        return []

    for path in leaves(memo, ()):
        for wrong in ([], "abc", 3.5, None, {}, True):
            bad = copy.deepcopy(memo)
            node = bad
            for k in path[:-1]:
                node = node[k]
            if type(node[path[-1]]) is type(wrong):
                continue
            node[path[-1]] = wrong
            out.append(("/".join(str(p)[:8] for p in path) + f"={wrong!r}", bad))
    return out


@pytest.mark.parametrize("memo_name", [".file-sha256.json", ".encoder-facts.json"])
@pytest.mark.parametrize("backend", ["timm", "open_clip", "timm-name"])
def test_memo_files_of_the_wrong_shape_are_derived_again(models, tmp_path, memo_name, backend):
    if backend == "timm-name":
        spec = "timm:vit_small_patch16_224:random"
    else:
        prefix, src = models[backend]
        spec = f"{prefix}{shutil.copytree(src, tmp_path / backend)}"
    cache = tmp_path / "cache"
    hash_memo = cache / ".file-sha256.json"
    clean = resolve_encoder(spec).info
    assert resolve_encoder(spec, hash_memo).info == clean  # writes both memos
    memo_file = cache / memo_name
    if not memo_file.is_file():
        pytest.skip(f"{backend} writes no {memo_name}")
    good = json.loads(memo_file.read_text())
    cases = _wrong_shapes(good)
    assert len(cases) > 4
    for what, bad in cases:
        memo_file.write_text(json.dumps(bad))
        try:
            info = resolve_encoder(spec, hash_memo).info
        except FeatstoreError as exc:
            pytest.fail(f"{memo_name} with {what}: {exc}")
        except Exception as exc:  # noqa: BLE001 - the point: no library exception escapes
            pytest.fail(f"{memo_name} with {what}: {type(exc).__name__}: {exc}")
        assert info == clean, what
        assert isinstance(json.loads(memo_file.read_text()), dict), what


@pytest.mark.parametrize("backend", ["hf", "hf-prefix", "timm", "open_clip"])
def test_random_on_a_folder_is_refused_not_ignored(models, backend):
    prefix, folder = models[backend.removesuffix("-prefix")]
    prefix = "hf:" if backend == "hf-prefix" else prefix
    with pytest.raises(EncoderNotFoundError, match="drop ':random'"):
        load_encoder(f"{prefix}{folder}:random", "cpu")


@pytest.mark.parametrize("spec", ["pixels:random", "pixels:8:random"])
def test_random_on_the_pixel_baseline_is_refused(spec):
    with pytest.raises(EncoderNotFoundError, match="no weights"):
        load_encoder(spec, "cpu")


@pytest.mark.parametrize("spec", ["dinov3-vits16", "biomedclip", "timm:vit_small_patch16_224"])
def test_random_on_a_name_is_honoured_and_flagged(spec):
    info = resolve_encoder(f"{spec}:random").info
    assert info.random_init and "random-init" in info.source
