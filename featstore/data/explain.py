"""Pydantic's validation errors, told the manifest's way: the dataset, the field and
the fix (a near-miss key gets 'did you mean')."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from featstore.errors import ManifestError


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


def _known_keys(loc: tuple[Any, ...], model: type[BaseModel]) -> list[str]:
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


def explain(
    err: ValidationError, raw: dict[str, Any], source: Path, model: type[BaseModel]
) -> ManifestError:
    """A pydantic error as a `ManifestError` naming the dataset, the field and the fix."""
    lines = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not str(p).startswith(("function-", "tagged-union")))
        where = _where(loc, raw)
        if e["type"] == "extra_forbidden":
            known = _known_keys(loc, model)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            lines.append(f"{where}: unknown key; {hint}")
        elif e["type"] == "missing":
            lines.append(f"{where}: required but missing; add it (see docs/manifest.md)")
        elif not loc:  # a check of the whole manifest: its message names the fields
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = repr(e.get("input"))
            got = got if len(got) <= 120 else got[:100] + " ..."
            lines.append(f"{where}: {msg} (got {got})")
    return ManifestError(f"{source}: invalid manifest\n  " + "\n  ".join(lines))
