"""A fully cached extract, `ls` and `probe` never import torch or a backend library.

Each command runs in a fresh interpreter (a runner that imports `pipelines.cli`, runs
the command and prints which heavy modules are in `sys.modules` at exit), over one
cache made by a cold extract of a transformers folder, a timm name and the open_clip
preset. The timm and open_clip facts that need their library come from the facts
memo beside the cache (`featstore.encode.derived`), which these tests also check:
keyed by config and library versions, read but never written on a read-only cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, synth_entry, write_manifest

from featstore.encode import derived
from featstore.encode.encoders import resolve_encoder

HEAVY = ("torch", "torchvision", "timm", "open_clip", "transformers")
# FEATSTORE_TEST_READ_ONLY=<folder>: every write under it fails with EROFS, as on a
# read-only mount (an audit hook: root ignores permission bits; see test_edges.py).
RUNNER = f"""
import errno, json, os, sys
ro = os.environ.get("FEATSTORE_TEST_READ_ONLY")
def audit(event, args):
    write = event == "open" and isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR)
    if ro and (write or event in ("os.mkdir", "os.remove", "os.rename", "os.rmdir")):
        path = os.path.abspath(os.fsdecode(args[0]))
        if path == ro or path.startswith(ro + os.sep):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
sys.addaudithook(audit)
from pipelines.cli import app
code = 0
try:
    app(sys.argv[1:], prog_name="featstore")
except SystemExit as exc:
    code = exc.code or 0
print("LOADED " + json.dumps([m for m in {HEAVY!r} if m in sys.modules]))
sys.exit(code)
"""
TIMM = "timm:vit_tiny_patch16_224:random"


def featstore(*args: str, cwd: Path, read_only: Path | None = None) -> tuple[str, list[str]]:
    """Run `featstore *args` in a fresh interpreter: its output and the heavy modules
    it had imported at exit."""
    env = {**os.environ, "FEATSTORE_TEST_READ_ONLY": str(read_only or "")}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("LOADED "))
    return out, json.loads(line.removeprefix("LOADED "))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_dinov3):
    """A cache made by a cold `featstore extract` (which did import torch and timm)."""
    work = tmp_path_factory.mktemp("lazy")
    encoders = f"['{tiny_dinov3}', '{TIMM}', 'biomedclip']"
    write_manifest(work, synth_entry("d", "cls2d", n=12), encoders, extra="batch_size: 4\n")
    out, loaded = featstore("extract", "-m", "manifest.yaml", "--device", "cpu", cwd=work)
    assert out.count(" new ") == 4 and {"torch", "timm", "open_clip"} <= set(loaded), out
    return work


def test_a_fully_cached_extract_imports_no_torch_nor_backend(cached):
    out, loaded = featstore("extract", "-m", "manifest.yaml", cwd=cached)
    assert out.count("  cached  ") == 4 and " new " not in out, out
    assert "[random_init]" in out  # the infos came from the memo, flags and all
    assert loaded == [], out


def test_ls_and_probe_of_cached_sets_import_no_torch(cached):
    out, loaded = featstore("ls", "cache", cwd=cached)
    rows = [ln for ln in out.splitlines() if ln.startswith("d ") and "True" in ln]
    assert len(rows) == 4 and loaded == [], out
    out, loaded = featstore("probe", "-m", "manifest.yaml", "--out", "results", cwd=cached)
    assert (cached / "results" / "results.csv").is_file() and loaded == [], out


def test_a_read_only_cache_is_read_without_the_memo_and_not_written(cached, tmp_path):
    """Without its facts memo, a read-only cache still answers (the libraries are
    imported to derive the facts) and not one byte is written."""
    cache = cached / "cache"
    memo = cache / derived.MEMO_NAME
    saved = memo.read_bytes()
    memo.unlink()
    try:
        before = _files(cache)
        out, loaded = featstore("extract", "-m", "manifest.yaml", cwd=cached, read_only=cache)
        assert out.count("  cached  ") == 4 and {"timm", "open_clip"} <= set(loaded), out
        assert _files(cache) == before
    finally:
        memo.write_bytes(saved)
    out, loaded = featstore("extract", "-m", "manifest.yaml", cwd=cached, read_only=cache)
    assert out.count("  cached  ") == 4 and loaded == [], out  # the memo is read


def test_torch_version_is_read_without_importing_torch():
    code = (
        "import sys; from featstore.encode.protocol import torch_version; v = torch_version(); "
        "assert 'torch' not in sys.modules; import torch; print(v == torch.__version__, v)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.startswith("True "), done.stdout + done.stderr


def _timm_folder(folder: Path, width: int) -> Path:
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
        embed_dim=width, num_heads=2,
    )  # fmt: skip
    timm.models.save_for_hf(model, folder, safe_serialization=True)
    return folder


def test_facts_memo_follows_config_edits_and_library_versions(tmp_path, monkeypatch):
    hash_memo = tmp_path / "cache" / ".file-sha256.json"
    folder = _timm_folder(tmp_path / "timm", width=32)
    spec = f"timm:{folder}"
    first = resolve_encoder(spec, hash_memo).info
    assert (tmp_path / "cache" / derived.MEMO_NAME).is_file() and first.hidden_size == 32
    assert len(json.loads((tmp_path / "cache" / derived.MEMO_NAME).read_text())) == 1
    assert resolve_encoder(spec, hash_memo).info == first  # read back
    memo = tmp_path / "cache" / derived.MEMO_NAME
    ((name, facts),) = json.loads(memo.read_text()).items()
    del facts["cls_token"]  # as if written before a field was added: never its default
    memo.write_text(json.dumps({name: facts}))
    assert resolve_encoder(spec, hash_memo).info == first
    assert "cls_token" in json.loads(memo.read_text())[name]  # derived and written again

    config = json.loads((folder / "config.json").read_text())
    _timm_folder(folder, width=64)  # an edited architecture, same folder
    assert json.loads((folder / "config.json").read_text()) != config
    edited = resolve_encoder(spec, hash_memo).info
    assert edited.hidden_size == 64 and edited.config_sha256 != first.config_sha256
    assert len(json.loads((tmp_path / "cache" / derived.MEMO_NAME).read_text())) == 2

    real = derived.version
    monkeypatch.setattr(derived, "version", lambda p: "99.0.0" if p == "timm" else real(p))
    assert resolve_encoder(spec, hash_memo).info == edited  # derived again, same facts
    assert len(json.loads((tmp_path / "cache" / derived.MEMO_NAME).read_text())) == 3


def test_a_damaged_memo_or_entry_is_derived_again(tmp_path):
    hash_memo = tmp_path / ".file-sha256.json"
    memo = tmp_path / derived.MEMO_NAME
    made = []

    def derive() -> dict[str, object]:
        made.append(1)
        return {"n": len(made)}

    def parse(d: dict[str, object]) -> int:
        return int(d["n"])  # type: ignore[call-overload]

    assert derived.remembered(hash_memo, {"k": 1}, ("timm",), derive, parse) == 1
    assert derived.remembered(hash_memo, {"k": 1}, ("timm",), derive, parse) == 1
    assert derived.remembered(hash_memo, {"k": 2}, ("timm",), derive, parse) == 2
    (name,) = [k for k, v in json.loads(memo.read_text()).items() if v == {"n": 1}]
    memo.write_text(json.dumps({name: {"m": 1}}))  # an entry without its facts
    assert derived.remembered(hash_memo, {"k": 1}, ("timm",), derive, parse) == 3
    memo.write_text("{not json")
    assert derived.remembered(hash_memo, {"k": 1}, ("timm",), derive, parse) == 4
    assert derived.remembered(None, {"k": 1}, ("timm",), derive, parse) == 5  # no memo


def test_presets_find_hub_weights_and_skip_the_hub_client_when_absent(tmp_path, tiny_dinov3):
    """A preset's weights in the hub cache's layout are found (through the hub client);
    a preset whose repository is not in the cache does not import that client."""
    import shutil

    from featstore.encode.presets import PRESETS

    hub, rev = PRESETS["dinov3-vits16"]["hub"], "0" * 40
    repo = tmp_path / "hf" / f"models--{hub.replace('/', '--')}"
    shutil.copytree(tiny_dinov3, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    code = (
        "import sys; from featstore.encode.encoders import resolve_encoder as r; "
        "absent = r('dinov3-vitb16').info; client = 'huggingface_hub.hf_api' in sys.modules; "
        "found = r('dinov3-vits16').info; "
        "print(absent.random_init, client, found.random_init, found.source, found.hidden_size)"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert done.stdout.split() == ["True", "False", "False", f"{hub}@{rev}", "32"], (
        done.stdout + done.stderr
    )
