"""Extraction on a GPU: bare forward vs the whole pipeline, DINOv3 ViT-S/B/L shapes.

    python benchmarks/gpu_extract.py [--models vits16,vitb16,vitl16] [--sizes 224,512]
        [--preprocess-on cpu,device] [--seconds 3] [--max-gb 3] [--shm-mb 1024]
        [--source-size N] [--json PATH] [--stand-in]

For each model (the preset architecture, random init: the speed is the same as with
real weights), input size and preprocessing placement:

- bare images/s: bf16-autocast `encode` on a ready device batch, after a warm-up,
  timed over about --seconds of steady forwards;
- pipeline images/s in the steady part of `extract_with` (PNG decode in DataLoader
  workers, preprocessing there (`cpu`: float32 tensors shipped) or on the GPU
  (`device`: the stored uint8 shipped), pinned non-blocking copies, cast and check on
  the device, writer pool): the completion time of every unit write is recorded, the
  first fifth of the units is the warm-up, and the rate is the items of the later units
  over their span. The whole call (allocation, worker start, finish) is timed apart;
- their ratio, peak GPU memory, MB/s written (steady), and the CPU used over the
  steady part, in cores: the main thread (the forward loop), the pin-memory thread,
  the loader worker processes, the writer threads and all other threads;
- what the loader ships: MB per batch and, workers x prefetch (2) batches in flight
  through /dev/shm. The `cpu` placement at 512 px ships 3 MB of float32 per image,
  so its workers are capped to keep that under --shm-mb.

Each case writes about --seconds of the bare rate worth of images (at most --max-gb
of tokens; a pool of --pool distinct PNGs listed over and over), and its set is deleted
after it. The PNGs are --source-size px (default: the input size, so nothing is
resized). Without a CUDA device it says so and exits 0; --stand-in runs every step on
the CPU with a tiny DINOv3 in place of each model (benchmarks/gpu/run.sh --dry-run).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from featstore.data import readers
from featstore.data.manifest import Dataset, Manifest
from featstore.data.settings import Synthetic
from featstore.encode.encoders import Encoder, load_encoder
from featstore.encode.preprocess import preprocess
from featstore.extraction.local import extract_with
from featstore.extraction.run import Options
from featstore.identity import requested
from featstore.store import schema, sets

PREFETCH = 2  # DataLoader prefetch_factor of featstore.extraction.run


def main() -> None:
    args = parse()
    cuda = torch.cuda.is_available()
    if not cuda and not args.stand_in:
        print("no CUDA device: gpu_extract.py measures nothing here (skipped)")
        sys.exit(0)
    device = "cuda" if cuda and not args.stand_in else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (stand-in model)"
    print(f"device: {name}, {os.cpu_count()} CPU cores, /dev/shm free {shm_free_mb():.0f} MB")
    print(HEADER)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        pools = {size: make_pool(tmp, args.source_size or size, args.pool) for size in args.sizes}
        for model in args.models:  # each model loads once
            enc, spec = encoder_for(model, device, tmp, args.stand_in)
            for size in args.sizes:
                rows += run_model(args, tmp, pools[size], enc, spec, model, size)
                if args.json:  # after every model and size: a killed run keeps its rows
                    args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=1))
            del enc
            if device == "cuda":
                torch.cuda.empty_cache()


HEADER = (
    f"{'model':<8} {'px':>4} {'prep':>6} {'n':>6} {'bare/s':>8} {'pipe/s':>8} {'ratio':>6} "
    f"{'whole s':>7} {'GPU GB':>6} {'MB/s':>6} {'main':>5} {'pin':>5} {'load':>9} "
    f"{'write':>9} {'other':>5} {'ship MB':>8}"
)


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="vits16,vitb16,vitl16")
    ap.add_argument("--sizes", default="224,512")
    ap.add_argument("--preprocess-on", default="cpu,device", help="cpu, device or cpu,device")
    ap.add_argument("--seconds", type=float, default=3.0, help="bare seconds; sizes each case")
    ap.add_argument("--max-gb", type=float, default=3.0, help="tokens written per case, at most")
    ap.add_argument("--min-units", type=int, default=10, help="units per case, at least")
    ap.add_argument("--unit-items", type=int, default=256, help="the manifest's unit_items")
    ap.add_argument("--batch-size", type=int, default=None, help="default 128 (64 above 256 px)")
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--shm-mb", type=float, default=1024.0, help="loader bytes in flight, cap")
    ap.add_argument("--source-size", type=int, default=None, help="PNG size (default: input)")
    ap.add_argument("--json", type=Path, default=None, help="write the rows here too")
    ap.add_argument("--pool", type=int, default=256, help="distinct PNGs per source size")
    ap.add_argument("--stand-in", action="store_true", help="tiny DINOv3 on the CPU (dry run)")
    args = ap.parse_args()
    args.models = args.models.split(",")
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.places = args.preprocess_on.split(",")
    if not set(args.places) <= {"cpu", "device"}:
        ap.error("--preprocess-on takes cpu, device or cpu,device")
    return args


def shm_free_mb() -> float:
    try:
        return shutil.disk_usage("/dev/shm").free / 1e6
    except OSError:
        return float("nan")


def make_pool(tmp: Path, src: int, n: int) -> readers.Prepared:
    """`n` distinct synthetic PNGs (cls2d) of `src` px."""
    ds = Dataset(
        name=f"pool{src}", format="synthetic", path=tmp / f"pool{src}",
        synthetic=Synthetic(kind="cls2d", n=n, size=src), task="classification", dims=2,
    )  # fmt: skip
    return readers.prepare(ds)


def repeated(tmp: Path, pool: readers.Prepared, n: int) -> readers.Prepared:
    """An `images` dataset of `n` items: the pool's PNGs listed over and over."""
    folder = tmp / f"{pool.ds.name}-x{n}"
    folder.mkdir(exist_ok=True)
    with open(folder / "index.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "split", "id"])
        for i in range(n):
            s = pool.samples[i % len(pool.samples)]
            w.writerow([s.image, s.label[0], "train", f"i{i:06d}"])
    ds = Dataset(
        name=folder.name, format="images", path=folder, index="index.csv",
        task="classification", dims=2,
    )  # fmt: skip
    return readers.prepare(ds)


def encoder_for(model: str, device: str, tmp: Path, stand_in: bool) -> tuple[Encoder, str]:
    """The preset `dinov3-<model>:random`, or a tiny DINOv3 saved like real weights."""
    if not stand_in:
        spec = f"dinov3-{model}:random"
        return load_encoder(spec, device), spec  # type: ignore[arg-type]
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    folder = tmp / "stand-in"
    if not folder.is_dir():
        torch.manual_seed(0)
        cfg = DINOv3ViTConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            patch_size=16, num_register_tokens=4, image_size=224,
        )  # fmt: skip
        DINOv3ViTModel(cfg).eval().save_pretrained(folder)
    return load_encoder(str(folder), device), str(folder)  # type: ignore[arg-type]


def bare_rate(enc: Encoder, x: torch.Tensor, seconds: float) -> float:
    """Images/s of `encode` on the ready batch `x`: 3 warm-up forwards, then steady ones
    until `seconds` have passed (synchronised every 5)."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(3):
        enc.encode(x)
    sync()
    steps, t0 = 0, time.perf_counter()
    while True:
        for _ in range(5):
            enc.encode(x)
        steps += 5
        sync()
        if time.perf_counter() - t0 >= seconds:
            return steps * len(x) / (time.perf_counter() - t0)


def run_model(
    args: argparse.Namespace,
    tmp: Path,
    pool: readers.Prepared,
    enc: Encoder,
    spec: str,
    model: str,
    size: int,
) -> list[dict[str, Any]]:
    """The bare rate of `enc` at `size` px, then one pipeline case per placement."""
    batch = args.batch_size or (128 if size <= 256 else 64)
    m = Manifest(
        cache=tmp / "cache", datasets=(pool.ds,), encoders=(spec,), resolutions=(size,),
        batch_size=batch, unit_items=args.unit_items,
    )  # fmt: skip
    ident = requested(pool.ds, m, pool.fingerprint, spec, size).with_weights(enc.info)
    pre = ident.preprocess()
    some = pool.samples[:batch]
    images = [preprocess(readers.load(pool.ds, s).image, None, pre)[0] for s in some]
    x = torch.from_numpy(np.concatenate((images * -(-batch // len(images)))[:batch]))
    x = x.to(enc.device)
    if enc.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    bare = bare_rate(enc, x, args.seconds)
    bare_gb = peak_gb(enc)
    del x
    layout = schema.layout_for(ident, 1, "single", batch, m.unit_items, m.codec)
    per_unit = layout.chunk_items
    n = int(min(bare * args.seconds, args.max_gb * 1e9 / layout.item_bytes))
    n = max(args.min_units, math.ceil(n / per_unit)) * per_unit
    data = repeated(tmp, pool, n)
    rows = []
    for place in args.places:
        row = pipeline_case(args, data, enc, spec, size, batch, place, m)
        row.update(model=model, bare_img_s=round(bare, 1))
        row["ratio"] = round(row["pipe_img_s"] / bare, 3)
        if row["gpu_peak_gb"] is not None:
            row["gpu_peak_gb"] = round(max(row["gpu_peak_gb"], bare_gb or 0.0), 2)
        print(line(row))
        rows.append(row)
    shutil.rmtree(data.ds.path)
    return rows


def peak_gb(enc: Encoder) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if enc.device.type == "cuda" else None


def workers_for(args: argparse.Namespace, batch: int, size: int, place: str) -> tuple[int, float]:
    """Loader workers under the /dev/shm cap, and MB one batch ships. `device` ships the
    stored uint8 (grey, at the source size); `cpu` float32 (B, 3, R, R)."""
    src = args.source_size or size
    mb = batch * (src * src if place == "device" else 3 * size * size * 4) / 1e6
    fit = int(args.shm_mb // (PREFETCH * mb)) if mb else args.workers
    return max(1, min(args.workers, fit)), mb


def pipeline_case(
    args: argparse.Namespace,
    data: readers.Prepared,
    enc: Encoder,
    spec: str,
    size: int,
    batch: int,
    place: str,
    m: Manifest,
) -> dict[str, Any]:
    """One `extract_with` of `data`: steady and whole rates, MB/s, CPU, GPU memory."""
    workers, ship_mb = workers_for(args, batch, size, place)
    cache = m.cache if isinstance(m.cache, Path) else Path(str(m.cache))
    run = m.model_copy(update={"datasets": (data.ds,)})
    opts = Options(
        device=enc.device.type, num_workers=workers, writers=args.writers, progress=False,
        preprocess_on=place,
    )  # type: ignore[arg-type]  # fmt: skip
    if enc.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with unit_clock() as units, CpuMeter() as cpu:
        t0 = time.perf_counter()
        s = extract_with(enc, spec, data, size, run, opts)
        whole = time.perf_counter() - t0
    shutil.rmtree(cache, ignore_errors=True)
    steady = steady_part(units, t0)
    items, mbytes, t_a, t_b = steady
    return dict(
        size=size, src=args.source_size or size, batch=batch, n=s.items, placement=place,
        pipe_img_s=round(items / (t_b - t_a), 1), whole_s=round(whole, 2),
        whole_img_s=round(s.items / whole, 1), steady_units=len(units) - warmup_units(units),
        units=len(units), mb_s=round(mbytes / (t_b - t_a), 1), gpu_peak_gb=peak_gb(enc),
        cpu_cores=cpu.cores(t_a, t_b), workers=workers, writers=args.writers,
        ship_mb_per_batch=round(ship_mb, 2), shm_in_flight_mb=round(workers * PREFETCH * ship_mb),
    )  # fmt: skip


Unit = tuple[float, int, int]  # (time written, items, bytes)


@contextmanager
def unit_clock() -> Iterator[list[Unit]]:
    """Record (perf_counter, items, bytes) as each unit's write returns (writer threads)."""
    done: list[Unit] = []
    orig = sets.UnitWriter.write

    def write(self: sets.UnitWriter, unit: int, *a: Any, **k: Any) -> int:
        nbytes = orig(self, unit, *a, **k)
        region = self.layout.unit_slice(unit)
        done.append((time.perf_counter(), region.stop - region.start, nbytes))
        return nbytes

    sets.UnitWriter.write = write  # type: ignore[method-assign]
    try:
        yield done
    finally:
        sets.UnitWriter.write = orig  # type: ignore[method-assign]


def warmup_units(units: list[Unit]) -> int:
    """Units counted as warm-up: the first fifth, at least one (none of fewer than 3)."""
    return 0 if len(units) < 3 else max(1, len(units) // 5)


def steady_part(units: list[Unit], t0: float) -> tuple[int, float, float, float]:
    """(items, MB, start, end) of the units written after the warm-up ones: their items
    over the span from the last warm-up unit's write to the last write."""
    units = sorted(units)
    k = warmup_units(units)
    start = units[k - 1][0] if k else t0
    later = units[k:]
    return sum(u[1] for u in later), sum(u[2] for u in later) / 1e6, start, units[-1][0]


class CpuMeter:
    """Samples this process's threads and its child processes' CPU time every 50 ms.

    cores(a, b): CPU seconds per wall second between times a and b, for the main thread
    (the forward loop), the pin-memory thread, the loader workers (children), the
    writer threads (`featstore-writer*`) and every other thread of this process (torch's
    intra-op threads of a CPU forward, CUDA's own threads).
    """

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.samples: list[tuple[float, dict[str, float]]] = []
        self.child_cpu: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="cpu-meter", daemon=True)

    def __enter__(self) -> CpuMeter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    def _loop(self) -> None:
        while not self.stop.wait(0.05):
            self.samples.append((time.perf_counter(), self._read()))

    def _read(self) -> dict[str, float]:
        names = {t.native_id: t.name for t in threading.enumerate()}
        main = threading.main_thread().native_id
        out = dict(main=0.0, pin=0.0, loader=0.0, writers=0.0, other=0.0)
        for t in self.proc.threads():
            name = names.get(t.id, "")
            key = "main" if t.id == main else None
            key = "writers" if name.startswith("featstore-writer") else key
            key = "pin" if "pin_memory" in name else key
            out[key or "other"] += t.user_time + t.system_time
        for c in self.proc.children(recursive=True):
            try:
                ct = c.cpu_times()
                self.child_cpu[c.pid] = ct.user + ct.system
            except psutil.Error:
                pass  # exited between listing and reading: its last reading stays
        out["loader"] = sum(self.child_cpu.values())
        return out

    def cores(self, a: float, b: float) -> dict[str, float]:
        if not self.samples:
            return {}
        ta, first = min(self.samples, key=lambda s: abs(s[0] - a))
        tb, last = min(self.samples, key=lambda s: abs(s[0] - b))
        span = max(tb - ta, 1e-9)
        return {k: round((last[k] - first[k]) / span, 2) for k in first}


def line(r: dict[str, Any]) -> str:
    c = r["cpu_cores"]
    gb = "-" if r["gpu_peak_gb"] is None else f"{r['gpu_peak_gb']:.1f}"
    load = f"{c.get('loader', 0):.1f}/{r['workers']}"
    write = f"{c.get('writers', 0):.1f}/{r['writers']}"
    return (
        f"{r['model']:<8} {r['size']:>4} {r['placement']:>6} {r['n']:>6} {r['bare_img_s']:8.0f} "
        f"{r['pipe_img_s']:8.0f} {r['ratio']:6.3f} {r['whole_s']:7.1f} {gb:>6} {r['mb_s']:6.0f} "
        f"{c.get('main', 0):5.2f} {c.get('pin', 0):5.2f} {load:>9} {write:>9} "
        f"{c.get('other', 0):5.2f} {r['ship_mb_per_batch']:8.1f}"
    )


if __name__ == "__main__":
    main()
