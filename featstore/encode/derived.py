"""Encoder facts that only a backend library can derive, remembered in a JSON memo.

timm and open_clip tell a model's patch size, prefix tokens, width and preprocessing
only from the model itself (built on the meta device), and a model name's config only
from their own registry; importing them (and torch) costs seconds. Those facts are a
pure function of what was asked (a name, or a config's hash) and of the libraries'
code, so they are remembered under that and the exact versions of the libraries
(torch's with its local tag), beside the file-hash memo: `<cache>/.encoder-facts.json`
(see `featstore.data.fingerprint.memo_for`). A fully cached extract then finds its sets
without importing them. A config edit or another library version is another key; a
damaged memo or entry is derived again; a read-only cache is read, never written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar, get_origin, get_type_hints

from featstore.data.fingerprint import save_memo
from featstore.encode.preprocess import interpolation
from featstore.encode.protocol import json_sha256, torch_version
from featstore.identity import EncoderInfo

MEMO_NAME = ".encoder-facts.json"
# Part of every key: raise it when featstore derives a fact differently.
FACTS_VERSION = 1
# EncoderInfo's fields that come from the call (labels, the weights' hash), not the facts
_GIVEN = ("name", "source", "weights_sha256", "random_init")
T = TypeVar("T")


def memo_path(hash_memo: Path | None) -> Path | None:
    """The facts memo beside the file-hash memo (None: derive every time)."""
    return None if hash_memo is None else hash_memo.with_name(MEMO_NAME)


def _load(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}  # only a cache: derive again
    return data if isinstance(data, dict) else {}


def remembered(
    hash_memo: Path | None,
    key: dict[str, Any],
    packages: tuple[str, ...],
    derive: Callable[[], dict[str, Any]],
    parse: Callable[[dict[str, Any]], T],
) -> T:
    """`parse(derive())`, or `parse` of what `derive` gave before for `key` and the
    same versions of `packages` (and of torch). `derive` returns JSON-ready facts and
    raises for what cannot be resolved (nothing is remembered then)."""
    versions = {p: version(p) for p in packages} | {"torch": torch_version()}
    name = json_sha256({"key": key, "versions": versions, "facts": FACTS_VERSION})
    path = memo_path(hash_memo)
    hit = _load(path).get(name)
    if isinstance(hit, dict):
        try:
            return parse(hit)
        except (KeyError, TypeError, ValueError):  # EncoderConfigError is a ValueError
            pass  # a damaged entry: derive it again
    facts = json.loads(json.dumps(derive()))  # what a later run reads back
    if path is not None:
        save_memo(path, {**_load(path), name: facts})
    return parse(facts)


# EncoderInfo's field types (its annotations are strings under `from __future__`)
_TYPES = get_type_hints(EncoderInfo)


def _of_type(value: object, kind: object) -> bool:
    """Whether a JSON value read back has the type of an EncoderInfo field: str, int
    (not bool), bool, a Literal's str, or a tuple of floats (a JSON list of numbers)."""
    if kind is bool:
        return type(value) is bool
    if kind is int:
        return type(value) is int
    if get_origin(kind) is tuple:
        return isinstance(value, list) and all(type(v) in (int, float) for v in value)
    return isinstance(value, str)  # str and the Literal names (checked below)


def info_from(facts: dict[str, Any], name: str, source: str, sha: str, random: bool) -> EncoderInfo:
    """The `EncoderInfo` of remembered `facts` with its labels and weights' hash."""
    expected = {f.name for f in fields(EncoderInfo)} - set(_GIVEN)
    if not isinstance(facts, dict) or set(facts) != expected:  # a field added since: never
        raise ValueError(f"remembered facts of {name} have other fields than {sorted(expected)}")
    wrong = [k for k, v in facts.items() if not _of_type(v, _TYPES[k])]
    if wrong or not facts["config_sha256"]:
        raise ValueError(f"remembered facts of {name} are damaged ({wrong})")
    info = EncoderInfo.from_dict(
        {**facts, "name": name, "source": source, "weights_sha256": sha, "random_init": random}
    )
    if {len(info.mean), len(info.std)} != {3}:
        raise ValueError(f"remembered facts of {name} are damaged (mean/std)")
    interpolation(info.interpolation, name)
    return replace(info, mean=tuple(map(float, info.mean)), std=tuple(map(float, info.std)))
