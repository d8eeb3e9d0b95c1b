"""One identity per feature set: the request and the content key cannot drift apart."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import REPO

from featstore.data.settings import Channels, Intensity
from featstore.errors import StoreMismatchError
from featstore.identity import ENCODER_CONTENT, EncoderInfo, Recipe, SetIdentity
from featstore.store import catalog, schema
from featstore.store.sets import FeatureSet

WEIGHTS = EncoderInfo("e", "src", "a" * 64, "dinov3_vit", 16, 4, 384, (0.5,) * 3, (0.2,) * 3, True)
RECIPE = Recipe(
    dataset="f" * 64,
    task="segmentation",
    dims=3,
    slice_axis="axial",
    fill_outlines=False,
    mask_map=((255, 1),),
    metadata=(("pixel size", "spacing"),),
    resolution=224,
    intensity=Intensity(mode="window", center=40, width=400),
    fit="resize",
    layers=1,
    dtype="float16",
    patch=True,
)
# A different value for every field of Recipe; a new field without one fails below.
OTHER = dict(
    dataset="e" * 64,
    task="classification",
    dims=2,
    slice_axis="coronal",
    fill_outlines=True,
    mask_map=((255, 2),),
    metadata=(("pixel size", "px"),),
    resolution=448,
    intensity=Intensity(mode="minmax"),
    fit="pad",
    layers=4,
    dtype="float32",
    patch=False,
    patch_layers=(-4, -1),
    patch_pool=2,
    quantize="int8",
    preprocessing=(("interpolation", "bicubic"),),
    tiling=(("tile_mpp", 0.5), ("tile_size", 224)),
    decode=1,
    channels=Channels(
        mode="per-channel", inputs=({"source": "ct"}, {"source": "pet"}), combine="mean"
    ),
    instances="membrane",
)
# Fields left out of both views while None, so that older sets keep their keys.
OPTIONAL = {"tiling", "decode", "channels", "instances"}


def test_every_recipe_field_is_in_both_views_and_changes_both():
    ident = SetIdentity(RECIPE, "dinov3-vits16", WEIGHTS)
    names = {f.name for f in dataclasses.fields(Recipe)}
    assert names == set(OTHER), "give every new Recipe field a changed value in OTHER"
    request, content = ident.request(), ident.content()
    shown = names - OPTIONAL  # RECIPE leaves them None
    assert set(request) - {"encoder", "format"} == shown == set(content) - {"encoder", "format"}
    for name, value in OTHER.items():
        changed = SetIdentity(dataclasses.replace(RECIPE, **{name: value}), ident.encoder, WEIGHTS)
        assert changed.request() != request, f"{name} does not reach the request"
        assert changed.key() != ident.key(), f"{name} does not reach the content key"
        assert Recipe.from_dict(changed.recipe.to_dict()) == changed.recipe, name


def test_encoder_weights_change_the_key_but_not_the_request():
    ident = SetIdentity(RECIPE, "dinov3-vits16", WEIGHTS)
    for name in ENCODER_CONTENT:
        value = getattr(WEIGHTS, name)
        new = (
            not value
            if isinstance(value, bool)
            else value * 2
            if not isinstance(value, str)
            else value + "x"
        )
        other = ident.with_weights(dataclasses.replace(WEIGHTS, **{name: new}))
        assert other.key() != ident.key(), name
        assert other.request() == ident.request()
    renamed = ident.with_weights(dataclasses.replace(WEIGHTS, name="moved", source="/elsewhere"))
    assert renamed.key() == ident.key()  # a moved model folder keeps its feature sets


def test_identity_round_trips_through_attributes():
    ident = SetIdentity(RECIPE, "dinov3-vits16", WEIGHTS)
    again = SetIdentity.from_attrs(ident.to_attrs())
    assert again == ident and again.key() == ident.key()
    pre = again.preprocess()
    assert pre.mean == WEIGHTS.mean and pre.resolution == 224 and pre.intensity.mode == "window"


def test_request_needs_no_weights_but_the_key_does():
    ident = SetIdentity(RECIPE, "dinov3-vits16")
    assert ident.request()["encoder"] == "dinov3-vits16"
    with pytest.raises(ValueError, match="not loaded"):
        ident.key()


def test_set_of_an_older_format_is_refused_with_the_fix(tmp_path):
    ident = SetIdentity(
        dataclasses.replace(RECIPE, task="classification", patch=False), "e", WEIGHTS
    )
    layout = schema.layout_for(ident, 4, "single", 2, 2)
    spacing = {"spacing": ["1"] * 4}  # every coordinate the recipe records
    items = schema.Items(list("abcd"), [0] * 4, ["train"] * 4, np.zeros(4, np.int64), spacing)
    path = tmp_path / "s.zarr"
    fs, compute = FeatureSet(path), {"device": "cpu", "preprocess_on": "cpu"}
    assert fs.open_or_create(ident, layout, lambda: items, {"name": "t"}, lambda: compute) == "new"
    assert (
        fs.open_or_create(ident, layout, lambda: items, {"name": "t"}, lambda: compute) == "resumed"
    )
    zarr.open_group(path, mode="r+", use_consolidated=False).attrs["featstore_format"] = 1
    with pytest.raises(StoreMismatchError, match=r"another featstore format.*re-extract"):
        fs.open_or_create(ident, layout, lambda: items, {"name": "t"}, lambda: compute)
    assert catalog.find_set(tmp_path, ident.request()) is None


def _modules(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in it, as a dotted name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return found


def _imports(folder: Path) -> set[str]:
    return {m.split(".")[0] for path in folder.rglob("*.py") for m in _modules(path)}


def test_library_never_imports_the_stages():
    assert "pipelines" not in _imports(REPO / "featstore")


# What each room must not import (DESIGN.md, "Library layout"), through any module it
# imports: imports run downhill only, data -> identity -> encode/store ->
# extraction/probing -> report; errors.py and places.py sit under them all.
UPHILL = ("featstore.identity", "featstore.encode", "featstore.store", "featstore.extraction")
ROOM_RULES = {
    "data": (*UPHILL, "featstore.probing", "featstore.report", "torch"),
    "encode": ("featstore.store", "featstore.probing", "featstore.report", "featstore.extraction"),
    "store": ("torch", "featstore.encode", "featstore.probing", "featstore.extraction"),
    "probing": ("featstore.encode", "featstore.extraction", "featstore.data.readers"),
    "report": (
        "torch",
        "featstore.encode.encoders",
        "featstore.extraction",
        "featstore.data.readers",
    ),
}
# Beside the folders: the generic modules every room may use import no room.
BASE_RULES = {"errors.py": ("featstore.",), "places.py": ("featstore.data", *UPHILL)}


def _module_of(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


def _graph() -> dict[str, set[str]]:
    """featstore module -> everything it imports (featstore modules resolved: `from
    featstore.x import y` is featstore.x.y when that is a module, else featstore.x)."""
    known = {_module_of(p) for p in (REPO / "featstore").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in (REPO / "featstore").rglob("*.py"):
        found = set()
        for m in _modules(path):
            if m.startswith("featstore"):
                while m not in known and "." in m:  # a name imported from a module
                    m = m.rsplit(".", 1)[0]
            found.add(m)
        graph[_module_of(path)] = found
    return graph


def _reached(start: str, graph: dict[str, set[str]]) -> dict[str, str]:
    """Every module `start` imports, directly or through others -> the module that
    imports it on the way (for the message)."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        here = todo.pop()
        for m in graph.get(here, ()):
            if m not in seen:
                seen[m] = here
                todo.append(m)
    return seen


def _breaches(modules: list[str], banned: tuple[str, ...]) -> set[str]:
    graph = _graph()
    out = set()
    for mod in modules:
        for m, via in _reached(mod, graph).items():
            if any(m == b or m.startswith(b + ".") or (b.endswith(".") and m.startswith(b))
                   for b in banned):  # fmt: skip
                out.add(f"{mod} reaches {m}" + ("" if via == mod else f" through {via}"))
    return out


# Walls not yet built, each with the work that removes it. The list only shrinks.
KNOWN_BREACHES: set[str] = set()


def _room_modules(room: str) -> list[str]:
    return [
        _module_of(p)
        for p in (REPO / "featstore" / room).rglob("*.py")
        # the trainable heads are the probes' one torch module (DESIGN.md)
        if not (room == "probing" and p.name == "heads.py")
    ]


@pytest.mark.parametrize("room", sorted(ROOM_RULES))
def test_rooms_keep_their_walls_through_every_import(room):
    """A wall broken through a third module fails too (data -> x -> store)."""
    broken = _breaches(_room_modules(room), ROOM_RULES[room])
    assert not broken - KNOWN_BREACHES, sorted(broken - KNOWN_BREACHES)


@pytest.mark.parametrize("name", sorted(BASE_RULES))
def test_the_generic_modules_import_no_room(name):
    broken = _breaches([f"featstore.{name.removesuffix('.py')}"], BASE_RULES[name])
    assert not broken, sorted(broken)


def test_the_wall_check_follows_imports_through_a_third_module(tmp_path, monkeypatch):
    """The check itself: a data module that imports store only through another data
    module is caught (the test that the walls test can fail)."""
    graph = {
        "featstore.data.a": {"featstore.data.b"},
        "featstore.data.b": {"featstore.store.sets"},
        "featstore.store.sets": set(),
    }
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: graph)
    assert _breaches(["featstore.data.a"], ROOM_RULES["data"]) == {
        "featstore.data.a reaches featstore.store.sets through featstore.data.b"
    }


def test_probes_import_torch_only_in_the_trainable_heads():
    for path in (REPO / "featstore" / "probing").rglob("*.py"):
        if path.name != "heads.py":
            assert "torch" not in {m.split(".")[0] for m in _modules(path)}, path


def test_no_module_runs_the_cli_from_a_main_block():
    for path in [*(REPO / "featstore").rglob("*.py"), *(REPO / "pipelines").glob("*.py")]:
        assert "__main__" not in path.read_text(), f"{path}: use the `featstore` command"


def test_no_room_shadows_the_api():
    """A subpackage named like an API function would replace it once imported."""
    import importlib

    import featstore

    for path in (REPO / "featstore").rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        importlib.import_module(".".join(p for p in rel.parts if p != "__init__"))
    for name in featstore.__all__:
        assert callable(getattr(featstore, name)), f"featstore.{name} is shadowed"
