"""How long a fully cached `featstore extract` takes, beside the import of featstore.

    python benchmarks/cached_run.py        # dinov3-vits16, timm ViT-S/16, biomedclip
    python benchmarks/cached_run.py --encoders dinov3-vitb16 --n 40 --repeats 5

Extracts a small synthetic manifest once (cold), then times `featstore extract` on
the same manifest again in fresh processes (every set cached: the identity comes
from config files, weight hashes and the facts memo; neither torch nor timm nor
open_clip is imported, which the last line checks) and `python -c "import featstore;
import pipelines.cli"` alone, and with the extract stage's own imports (zarr, the
readers; torch is imported only where units are computed). Target (issue 17):
cached - import < 2 s. Medians of --repeats; the machine is shared, so say what else
was running.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MANIFEST = """\
cache: cache
encoders: [{encoders}]
resolutions: [32]
datasets:
  - name: a
    format: synthetic
    synthetic: {{kind: cls2d, n: {n}, size: 32, seed: 0}}
    path: data/a
    task: classification
    dims: 2
  - name: b
    format: synthetic
    synthetic: {{kind: seg3d, n: 6, size: 32, slices: 4, seed: 0}}
    path: data/b
    task: segmentation
    dims: 3
    splits: {{ratios: [0.5, 0.25, 0.25], seed: 0}}
"""
CLI = [sys.executable, "-c", "from pipelines.cli import app; app()"]
HEAVY = ("torch", "timm", "open_clip", "transformers")
# the extract, then which heavy modules it had imported (on stderr, after its output)
LOADED = (
    "import sys\nfrom pipelines.cli import app\ntry:\n    app()\nfinally:\n"
    f"    print('loaded:', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)"
)


def _seconds(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--encoders", default="dinov3-vits16,timm:vit_small_patch16_224:random,biomedclip"
    )
    ap.add_argument("--n", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    encoders = ", ".join(f"'{e}'" for e in args.encoders.split(","))
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        (tmp / "m.yaml").write_text(MANIFEST.format(encoders=encoders, n=args.n))
        extract = [*CLI, "extract", "--manifest", "m.yaml"]
        cold = _seconds(extract, tmp)
        cached = [_seconds(extract, tmp) for _ in range(args.repeats)]
        bare = [
            _seconds([sys.executable, "-c", "import featstore, pipelines.cli"], tmp)
            for _ in range(args.repeats)
        ]
        stage = [  # what an extract imports before it can look at the cache (zarr, readers)
            _seconds([sys.executable, "-c", "import pipelines.cli, featstore.extraction.run"], tmp)
            for _ in range(args.repeats)
        ]
        check = [sys.executable, "-c", LOADED, "extract", "--manifest", "m.yaml"]
        done = subprocess.run(check, cwd=tmp, capture_output=True, text=True)
        loaded = done.stderr.strip().splitlines()[-1]
    c, b, s = statistics.median(cached), statistics.median(bare), statistics.median(stage)
    print(f"encoders {args.encoders}; 2 datasets + pixel baseline")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; load {os.getloadavg()}")
    print(f"cold extract          : {cold:6.2f} s")
    print(f"cached extract        : {c:6.2f} s (median of {args.repeats})")
    print(f"import featstore + cli: {b:6.2f} s (median of {args.repeats})")
    print(f"import extract stage  : {s:6.2f} s (median of {args.repeats}; zarr, readers)")
    print(f"cached - import       : {c - b:6.2f} s (target < 2 s)")
    print(f"cached - stage import : {c - s:6.2f} s (the cache look-up itself)")
    print(f"cached extract {loaded} (of {', '.join(HEAVY)})")


if __name__ == "__main__":
    main()
