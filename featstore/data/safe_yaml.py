"""Reading a manifest's YAML safely: a small UTF-8 document, bounded in size, nesting
and alias expansion (a "billion laughs" is refused in milliseconds), scalars that
PyYAML cannot construct reported as YAML errors. Every refusal is a `ManifestError`
naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from featstore.errors import ManifestError

MAX_MANIFEST_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # values in the document with every alias expanded (billion laughs)
MAX_YAML_DEPTH = 32  # nesting (PyYAML composes recursively)


class _Loader(yaml.SafeLoader):
    """SafeLoader bounded in nesting depth (PyYAML composes recursively)."""

    _depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(
                    f"nested deeper than {MAX_YAML_DEPTH} levels (line {self.line + 1}); "
                    "a manifest needs a handful"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _strict(construct: Any) -> Any:
    """A scalar constructor whose failures are YAML errors: PyYAML's own raise ValueError
    (`!!int x`, `2001-02-30`), IndexError (`!!int ""`), KeyError (`!!bool maybe`),
    AttributeError (`!!timestamp x`)."""

    def wrapped(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> Any:
        try:
            return construct(loader, node)
        except (ValueError, KeyError, IndexError, AttributeError, TypeError, OverflowError):
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {node.value!r} as {node.tag}", node.start_mark
            ) from None

    return wrapped


for _kind in ("int", "float", "bool", "null", "timestamp", "binary"):
    _tag = f"tag:yaml.org,2002:{_kind}"
    _Loader.add_constructor(_tag, _strict(yaml.SafeLoader.yaml_constructors[_tag]))


def _expanded_size(root: yaml.Node) -> int:
    """How many values `root` holds with every alias expanded, capped at MAX_YAML_NODES + 1.

    An alias is the same node object as its anchor, so sizes are memoised per node: a
    "billion laughs" costs its few real nodes here, not its 10^9 expanded ones (which
    pydantic would walk, for minutes and gigabytes). A cycle (`&a [*a]`) is infinite.
    """
    cap = MAX_YAML_NODES + 1
    size: dict[int, int] = {}
    open_: set[int] = set()  # nodes entered but not finished: the current path
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        kids: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        if finished:
            open_.discard(id(node))
            size[id(node)] = min(cap, 1 + sum(size[id(k)] for k in kids))
        elif id(node) in open_:
            return cap  # an alias to one of its own ancestors
        elif id(node) not in size:
            open_.add(id(node))
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in size)
    return size[id(root)]


def parse_yaml(source: Path) -> Any:
    """The manifest's YAML, refused (ManifestError naming the file) when it is not a small
    UTF-8 YAML document: binary garbage, a huge file, an alias bomb or deep nesting."""
    try:
        with source.open("rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise ManifestError(f"{source}: cannot read the manifest ({exc})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(
            f"{source}: larger than {MAX_MANIFEST_BYTES >> 20} MiB; a manifest is a small "
            "YAML file (see docs/manifest.md): is this the right file?"
        )
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ManifestError(
            f"{source}: not a text file (byte {exc.start} is not UTF-8); "
            "pass --manifest PATH to the YAML manifest"
        ) from None
    try:
        loader = _Loader(text)  # checks the characters already
        try:
            node = loader.get_single_node()
            if node is not None and _expanded_size(node) > MAX_YAML_NODES:
                raise ManifestError(
                    f"{source}: more than {MAX_YAML_NODES} values once its aliases (*name) "
                    "are expanded, or an alias refers to itself; write the manifest out "
                    "without such aliases"
                )
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ManifestError(f"{source}: not valid YAML: {exc}") from None
