"""Dry run only: make this interpreter see what the GPU machine's image would.

    python benchmarks/gpu/image_like.py TARGET FOLDER

Writes FOLDER/sitecustomize.py. With FOLDER first on PYTHONPATH, every top-level
module of a distribution installed here that the device image (device-image.txt)
lacks (and that none of the image's packages requires here) can be imported only
from TARGET, the folder the wheelhouse was installed
into; anywhere else it is a ModuleNotFoundError. So the dry run on the CPU machine
fails, as the GPU machine would, when a needed wheel is missing from the wheelhouse,
even though this project's .venv has every package.
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from wheels import applies, image, pins, target_env

SITE = '''"""Written by benchmarks/gpu/image_like.py for the GPU dry run: the image's view."""
import importlib.machinery
import sys

BLOCKED = {blocked!r}
TARGET = {target!r}


class _ImageOnly:
    """Modules that the device image lacks come from the wheelhouse's target only."""

    def find_spec(self, name, path=None, target=None):
        if path is not None or name not in BLOCKED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, [TARGET])
        if spec is None:
            raise ModuleNotFoundError(
                f"No module named {{name!r}} (dry run: the GPU machine's image lacks it "
                "and the wheelhouse does not bring it; add it to benchmarks/gpu/wheels.txt)",
                name=name,
            )
        return spec


sys.meta_path.insert(0, _ImageOnly())
'''


def top_level(dist: metadata.Distribution) -> set[str]:
    """Importable top-level names a distribution installs."""
    text = dist.read_text("top_level.txt")
    if text:
        return {n.strip() for n in text.split() if n.strip()}
    names = set()
    for f in dist.files or []:
        first = f.parts[0]
        if len(f.parts) == 1 and first.endswith(".py"):
            names.add(first[:-3])
        elif len(f.parts) > 1 and first.isidentifier():  # not *.dist-info, *.data, ..
            names.add(first)
    return names - {"__pycache__"}


def image_closure(dists: dict[str, metadata.Distribution]) -> set[str]:
    """The image's packages installed here and, transitively, what they require here:
    on the machine the image brings its own packages' dependencies."""
    env = target_env(f"{sys.version_info[0]}.{sys.version_info[1]}")
    todo = [n for n in image() if n in dists]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for line in dists[name].requires or []:
            req = Requirement(line)
            dep = canonicalize_name(req.name)
            if dep in dists and applies(req, env):
                todo.append(dep)
    return seen


def main() -> None:
    target, folder = sys.argv[1], Path(sys.argv[2])
    dists = {canonicalize_name(d.metadata["Name"] or ""): d for d in metadata.distributions()}
    shipped = {canonicalize_name(p.name) for p in pins("3.12")} | {
        canonicalize_name(p.name) for p in pins(f"{sys.version_info[0]}.{sys.version_info[1]}")
    }
    allowed_dists = image_closure(dists) - shipped
    allowed: set[str] = set()
    others: set[str] = set()
    for name, dist in dists.items():
        if name == "featstore":
            continue  # the project itself: on PYTHONPATH from the working tree
        (allowed if name in allowed_dists else others).update(top_level(dist))
    blocked = sorted(others - allowed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SITE.format(blocked=blocked, target=target))
    print(f"dry run: {len(blocked)} top-level modules not in the device image come from {target}")


if __name__ == "__main__":
    main()
