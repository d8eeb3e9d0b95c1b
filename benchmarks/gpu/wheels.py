"""The wheelhouse for the GPU machine: download it, and check that it is complete.

    python benchmarks/gpu/wheels.py download [--python 3.12] [--dest .whl/cp312]
    python benchmarks/gpu/wheels.py check [--python 3.12] [--dir .whl/cp312]
    python benchmarks/gpu/wheels.py check --installed     # on the machine itself

The GPU machine reaches no package registry, and its image (device-image.txt) lacks
some of featstore's dependencies (zarr, numcodecs, dask, distributed, pydantic, ...).
`download` fetches the cp3XX manylinux (or pure-Python) wheel of every line of
wheels.txt, pinned to the version this project is tested with, into an ignored
folder that travels with the working tree (carry it; it must stay well under the
64 MiB a call may carry). `check` then proves offline that nothing is missing: every
Requires-Dist of featstore (pyproject.toml) and, recursively, of each wheel is met by
a wheel in the folder or by a package of the image (at a satisfying version where the
image's version is known), with markers evaluated for Linux x86-64 and the target
Python. `check --installed` checks the same requirements against what the running
interpreter can import (the image plus the installed wheels): run.sh runs it first on
the GPU machine, where the image's versions are real. Exit status 1 on any problem.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PINS = HERE / "wheels.txt"
IMAGE = HERE / "device-image.txt"
LIMIT_MB = 40.0  # of the 64 MiB a call carries; the repository itself travels too
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")


def target_env(python: str) -> dict[str, str]:
    """Marker environment of CPython `python` (e.g. "3.12") on Linux x86-64."""
    env = dict(default_environment())
    env.update(
        python_version=python,
        python_full_version=f"{python}.0",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        sys_platform="linux",
        platform_system="Linux",
        platform_machine="x86_64",
        os_name="posix",
        extra="",
    )
    return env


def applies(req: Requirement, env: dict[str, str], extras: frozenset[str] = frozenset()) -> bool:
    """Whether `req` is needed in `env` when its parent was asked for with `extras`."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**env, "extra": e}) for e in ("", *extras))


def pins(python: str, path: Path = PINS) -> list[Requirement]:
    """The NAME==VERSION lines of wheels.txt whose markers hold for `python`."""
    env = target_env(python)
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [r for r in map(Requirement, filter(None, lines)) if applies(r, env)]


def image(path: Path = IMAGE) -> dict[str, Version | None]:
    """The device image's packages: name -> version where one was read, else None."""
    out: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version) if version else None
    return out


def featstore_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[Requirement]:
    """featstore's core dependencies (no extras: the GPU run needs none)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


@dataclass(frozen=True)
class Wheel:
    name: str
    version: Version
    path: Path
    requires: tuple[Requirement, ...]


def read_wheels(folder: Path) -> tuple[dict[str, Wheel], list[str]]:
    """The wheels of `folder` by canonical name, and problems (duplicates, bad names)."""
    wheels: dict[str, Wheel] = {}
    problems = []
    for path in sorted(folder.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(path.name)
        if name in wheels:
            problems.append(
                f"{path.name}: a second wheel of {name} (also {wheels[name].path.name}); "
                "pip refuses two versions of one package: delete one"
            )
            continue
        with zipfile.ZipFile(path) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            msg = Parser().parsestr(z.read(meta).decode())
        reqs = tuple(Requirement(r) for r in msg.get_all("Requires-Dist") or [])
        wheels[name] = Wheel(name, version, path, reqs)
    return wheels, problems


def tag_problem(wheel: Wheel, python: str) -> str | None:
    """Why `wheel` cannot install on CPython `python` / Linux x86-64, or None."""
    cp = "cp" + python.replace(".", "")
    for tag in parse_wheel_filename(wheel.path.name)[3]:
        abi_ok = tag.interpreter == cp or tag.abi == "none" or tag.abi == "abi3"
        if tag.abi == "abi3" and int(tag.interpreter[3:] or 0) > int(cp[3:]):
            abi_ok = False
        plat_ok = tag.platform == "any" or (
            tag.platform.startswith("manylinux") and tag.platform.endswith("x86_64")
        )
        if abi_ok and plat_ok:
            return None
    return f"{wheel.path.name}: no tag for CPython {python} on Linux x86-64"


def check_folder(
    folder: Path,
    python: str,
    pinned: list[Requirement] | None = None,
    have: dict[str, Version | None] | None = None,
    roots: list[Requirement] | None = None,
) -> tuple[list[str], list[str]]:
    """(problems, notes) of the wheelhouse `folder` for CPython `python`, offline.

    pinned, have, roots: wheels.txt's pins, the image's packages and featstore's
    requirements (the defaults; tests give their own)."""
    env = target_env(python)
    pinned = pins(python) if pinned is None else pinned
    have = image() if have is None else have
    roots = featstore_requirements() if roots is None else roots
    wheels, problems = read_wheels(folder)
    notes: list[str] = []
    unread: dict[str, SpecifierSet] = {}
    for pin in pinned:
        got = wheels.get(canonicalize_name(pin.name))
        if got is None or got.version not in pin.specifier:
            found = f"found {got.path.name}" if got else "absent"
            problems.append(f"{pin}: wheels.txt pins it, {found}; run wheels.py download")
    problems += [p for w in wheels.values() if (p := tag_problem(w, python))]
    size = sum(w.path.stat().st_size for w in wheels.values()) / 2**20
    if size > LIMIT_MB:
        problems.append(f"{folder}: {size:.1f} MiB of wheels, over the {LIMIT_MB:.0f} MiB budget")
    notes.append(f"{len(wheels)} wheels, {size:.1f} MiB, for CPython {python}")
    for parent, req in walk(roots, env, lambda n: _wheel_reqs(wheels, n)):
        name = canonicalize_name(req.name)
        if name in wheels:
            w = wheels[name]
            if req.specifier and w.version not in req.specifier:
                problems.append(f"{parent} needs {req}; the wheelhouse has {w.version}")
        elif name in have:
            v = have[name]
            if v is not None and req.specifier and v not in req.specifier:
                problems.append(
                    f"{parent} needs {req}; the image has {v}: add a pinned {req.name} to "
                    "wheels.txt"
                )
            elif v is None and req.specifier:
                unread[name] = unread.get(name, SpecifierSet()) & req.specifier
        else:
            problems.append(
                f"{parent} needs {req}: neither a wheel here nor in the device image; add "
                f"{req.name}==<the .venv's version> to {PINS.name} and download again"
            )
    if unread:
        notes.append(
            "in the image at versions not read here (run.sh checks them on the machine): "
            + ", ".join(f"{k}{v}" for k, v in sorted(unread.items()))
        )
    return problems, notes


def _wheel_reqs(wheels: dict[str, Wheel], name: str) -> tuple[Requirement, ...] | None:
    w = wheels.get(name)
    return None if w is None else w.requires


def walk(
    roots: list[Requirement],
    env: dict[str, str],
    requires_of: Callable[[str], Sequence[Requirement] | None],
) -> Iterator[tuple[str, Requirement]]:
    """(parent, requirement) for every requirement reachable from featstore's `roots`
    whose marker holds in `env`; a package's own needs are followed once per (name,
    extras). `requires_of(name)` gives a
    package's own Requires-Dist, or None where its needs are not followed (the image's
    packages: their dependencies are the image's business)."""
    todo = [("featstore", frozenset[str](), r) for r in roots]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        parent, asked, req = todo.pop()
        name, extras = canonicalize_name(req.name), frozenset(req.extras)
        if not applies(req, env, asked):
            continue
        yield parent, req  # every edge: each parent's specifier is checked
        if (name, extras) not in seen:
            seen.add((name, extras))
            todo += [(name, extras, r) for r in requires_of(name) or ()]


def check_installed() -> list[str]:
    """Problems of the running interpreter: each requirement reachable from featstore's
    core dependencies that is absent or at a version outside its specifier."""
    env = target_env(f"{sys.version_info.major}.{sys.version_info.minor}")
    problems = []

    def requires_of(name: str) -> list[Requirement] | None:
        try:
            return [Requirement(r) for r in metadata.distribution(name).requires or []]
        except metadata.PackageNotFoundError:
            return None

    for parent, req in walk(featstore_requirements(), env, requires_of):
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{parent} needs {req}: not installed")
            continue
        if req.specifier and Version(version) not in req.specifier:
            problems.append(f"{parent} needs {req}: {version} is installed")
    return problems


def untested(pinned: list[Requirement]) -> list[str]:
    """Pins that differ from the version installed in the running interpreter (run it
    with the project's .venv: the versions the test suite ran with)."""
    out = []
    for pin in pinned:
        try:
            version = Version(metadata.version(pin.name))
        except metadata.PackageNotFoundError:
            continue
        if version not in pin.specifier:
            out.append(f"{pin}: this interpreter, where the tests run, has {version}")
    return out


def download(python: str, dest: Path) -> None:
    """pip-download every pin of wheels.txt for `python` into `dest`; drop stale wheels."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {canonicalize_name(p.name): p for p in pins(python)}
    for path in dest.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(path.name)
        if name not in wanted or version not in wanted[name].specifier:
            path.unlink()  # another version, or no longer pinned: one version each
    have = {parse_wheel_filename(p.name)[0] for p in dest.glob("*.whl")}
    plats = [a for p in PLATFORMS for a in ("--platform", p)]
    for name, pin in wanted.items():
        if name in have:
            continue  # the pinned version is there already
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        cmd += ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
        subprocess.run([*cmd, *plats, "-d", str(dest), str(pin)], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("download", "check"):
        p = sub.add_parser(name)
        p.add_argument("--python", default="3.12", help="target CPython (the GPU machine: 3.12)")
        p.add_argument("--dir", "--dest", type=Path, default=None, help="default .whl/cpXY")
    check = sub.choices["check"]
    check.add_argument("--installed", action="store_true", help="check this interpreter instead")
    check.add_argument("--tested", action="store_true", help="pins = this interpreter's versions")
    args = ap.parse_args()
    folder = args.dir or REPO / ".whl" / ("cp" + args.python.replace(".", ""))
    if args.cmd == "download":
        download(args.python, folder)
        print(f"downloaded into {folder}")
        args.cmd = "check"
    if getattr(args, "installed", False):
        problems, notes = check_installed(), ["checked the running interpreter"]
    else:
        problems, notes = check_folder(folder, args.python)
    if getattr(args, "tested", False):
        problems += untested(pins(args.python))
    for line in notes:
        print(f"note: {line}")
    for line in problems:
        print(f"PROBLEM: {line}")
    print("wheelhouse check: " + ("FAILED" if problems else "ok"))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
