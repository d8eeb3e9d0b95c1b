"""The `featstore` command line (typer): each command parses options and calls a stage.

Heavy modules are imported inside the commands: `featstore probe` must never load
torch, and `featstore ls` should start instantly.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import typer

from featstore.data.manifest import DEFAULT_CACHE
from featstore.errors import FeatstoreError, Interrupted, ManifestError, StopRequested

if TYPE_CHECKING:
    from featstore.data.manifest import Manifest
    from featstore.store.sets import FeatureSet

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Frozen foundation-model features for medical images: extract once, probe many times.",
)

ManifestOpt = typer.Option(
    Path("data_manifest.yaml"), "--manifest", "-m", help="The data manifest (YAML)."
)
DatasetOpt = typer.Option([], "--dataset", "-d", help="Only these datasets (repeatable).")
EncoderOpt = typer.Option(
    [],
    "--encoder",
    "-e",
    help="Encoders to use instead of the manifest's (preset, folder, hub id; repeatable).",
)
ResolutionOpt = typer.Option(
    [], "--resolution", "-r", help="Input sizes instead of the manifest's (repeatable)."
)
StudyOpt = typer.Option(
    None,
    "--study",
    help="Only this study of the manifest's `studies:` (--encoder/--resolution narrow it).",
)
CacheOpt = typer.Option(
    None,
    "--cache",
    help="Feature-set folder or fsspec URL (s3://bucket/prefix); default: $FEATSTORE_CACHE, "
    "then the manifest's `cache:`.",
)


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[None]:
    """SIGINT/SIGTERM raise StopRequested: the extract stops cleanly and says how to resume."""

    def stop(signum: int, _frame: object) -> None:
        StopRequested.pending = signum  # in case this raise lands where it is swallowed
        raise StopRequested(signum)

    StopRequested.pending = None
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        StopRequested.pending = None


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _manifest(
    path: Path,
    datasets: list[str],
    encoders: list[str],
    resolutions: list[int],
    cache: str | None,
    study: str | None = None,
    need_data: bool = True,
) -> Manifest:
    from featstore.data.manifest import load_manifest

    m = load_manifest(path, cache, need_data=need_data)
    return m.select(datasets, encoders, resolutions, study=study)


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
        if not 0 <= i < n:
            raise ValueError
    except ValueError:
        raise typer.BadParameter(
            f"--shard {text!r}: expected i/n with 0 <= i < n, e.g. 0/2"
        ) from None
    return i, n


@app.command()
def extract(  # over 60 lines: typer declares its 19 options in the signature (41 lines)
    manifest: Path = ManifestOpt,
    dataset: list[str] = DatasetOpt,
    encoder: list[str] = EncoderOpt,
    resolution: list[int] = ResolutionOpt,
    cache: str | None = CacheOpt,
    study: str | None = StudyOpt,
    batch_size: int | None = typer.Option(None, help="Items per forward pass and per chunk."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    preprocess_on: str = typer.Option(
        "auto",
        help="Where intensity mapping, resize and mean/std run: cpu (decode workers), "
        "device (the encoder's device, on the stored integers) or auto (device on CUDA).",
    ),
    overwrite: bool = typer.Option(False, help="Replace existing feature sets of this request."),
    repair: bool = typer.Option(
        False, help="Decode every chunk of existing sets; recompute only the damaged units."
    ),
    skip_bad: bool = typer.Option(False, help="Record unreadable samples and go on."),
    shard: str = typer.Option("0/1", help="Work on units u with u % n == i (i/n)."),
    workers: int | None = typer.Option(None, help="Decode workers (default: 1 on CPU)."),
    writers: int = typer.Option(2, min=1, max=64, help="Writer threads (units written at once)."),
    threads: int | None = typer.Option(
        None, min=1, max=1024, help="Torch threads of a CPU forward pass (default: free cores)."
    ),
    baseline: bool = typer.Option(True, help="Also extract the raw-pixel baseline."),
    cluster: str | None = typer.Option(
        None, help="Run units as tasks on a new dask LocalCluster of N processes: local:N."
    ),
    scheduler: str | None = typer.Option(
        None, help="Run units as tasks on a running dask cluster (scheduler address)."
    ),
) -> None:
    """Extract CLS and patch features into content-addressed Zarr feature sets."""
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter("--device must be auto, cpu or cuda")
    if preprocess_on not in ("auto", "cpu", "device"):
        raise typer.BadParameter("--preprocess-on must be auto, cpu or device")
    try:
        from featstore.data.manifest import MAX_BATCH_SIZE

        if batch_size is not None and not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ManifestError(
                f"--batch-size {batch_size}: give 1 to {MAX_BATCH_SIZE} items per forward pass"
            )
        if workers is not None and not 0 <= workers <= 128:
            raise ManifestError(
                f"--workers {workers}: give 0 (decode in this process) to 128 decode processes"
            )
        m = _manifest(manifest, dataset, encoder, resolution, cache, study)
        if batch_size is not None:
            m = m.model_copy(update={"batch_size": batch_size})
        shards = _parse_shard(shard)
        # torch loads only now: a bad manifest or option is refused at once
        from featstore.extraction.run import Options
        from pipelines import extract as stage

        opts = Options(
            device=cast(Literal["auto", "cpu", "cuda"], device),
            preprocess_on=cast(Literal["auto", "cpu", "device"], preprocess_on),
            overwrite=overwrite,
            repair=repair,
            skip_bad=skip_bad,
            shard=shards,
            num_workers=workers,
            writers=writers,
            threads=threads,
        )
        with _stop_on_signals():
            stage.run(
                m, opts, baseline=baseline, cluster=cluster, scheduler=scheduler, echo=typer.echo
            )
    except Interrupted as exc:
        typer.secho(str(exc), fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(128 + exc.signum) from None
    except FeatstoreError as exc:
        _fail(exc)


def _numbers(text: str | None, kind: Any, flag: str) -> list[Any]:
    """A comma-separated option ("0.01,0.1,1") as numbers of `kind`."""
    if not text:
        return []
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ManifestError(
            f"{flag} {text!r}: give comma-separated {kind.__name__}s, e.g. "
            + ("0.01,0.1,1" if kind is float else "1,5,10")
        ) from None


@app.command()
def probe(
    manifest: Path = ManifestOpt,
    dataset: list[str] = DatasetOpt,
    encoder: list[str] = EncoderOpt,
    resolution: list[int] = ResolutionOpt,
    cache: str | None = CacheOpt,
    study: str | None = StudyOpt,
    out: Path = typer.Option(Path("results"), help="Results folder."),
    pool: str = typer.Option("mean", help="3D volume pooling: mean | max | cls+patch | abmil"),
    memory_mb: float | None = typer.Option(
        None,
        min=16,
        help="Train the linear segmentation head on every training patch, streaming blocks "
        "of at most this many MB (default: a fixed sample of patches in memory); score "
        "segmentation and run kNN in blocks of at most this many MB too.",
    ),
    scheduler: str | None = typer.Option(
        None, help="Run the probes' dask computations on a running cluster (address)."
    ),
    fractions: str | None = typer.Option(
        None,
        help="Label-efficiency curve: also fit every probe on these fractions of the train "
        "split, e.g. 0.01,0.05,0.1,0.25,0.5,1 (stratified, nested, whole patients).",
    ),
    shots: str | None = typer.Option(
        None, help="Label-efficiency curve: also fit on k training units per class, e.g. 1,5,10."
    ),
    repeats: int | None = typer.Option(
        None, min=1, help="Draws per curve point (repeat r uses seed r); default 1."
    ),
    seeds: str | None = typer.Option(
        None,
        help="Seed variance: refit the trainable probes (seg-decoder, --pool abmil, "
        "protocol: seed) with each of these seeds, e.g. 0,1,2,3,4: rows per seed and "
        "their mean (std, min, max). Linear and kNN on fixed features are fitted once.",
    ),
) -> None:
    """Fit linear / kNN / segmentation probes on cached features; write results."""
    try:
        from featstore.probing.options import POOLS, ProbeOptions, curve_options
        from pipelines import probe as stage

        if pool not in POOLS:
            raise ManifestError(f"--pool {pool!r}: give one of {', '.join(POOLS)}")
        curve = curve_options(
            _numbers(fractions, float, "--fractions"), _numbers(shots, int, "--shots"), repeats
        )
        # the data folders may be absent: the feature sets hold what probes need
        m = _manifest(manifest, dataset, encoder, resolution, cache, study, need_data=False)
        opts = ProbeOptions(
            pool=pool,  # type: ignore[arg-type]  # checked above
            protocol=m.protocol,
            memory_mb=memory_mb,
            curve=curve,
            seeds=tuple(sorted(_numbers(seeds, int, "--seeds"))),
        )
        with contextlib.ExitStack() as stack:
            if scheduler is not None:
                from featstore.extraction.cluster import connect  # torch-free

                client = stack.enter_context(connect(scheduler))
                typer.echo(f"dask dashboard: {client.dashboard_link}")
            else:
                stack.enter_context(_own_threads())
            stage.run(m, out, opts, manifest_file=manifest, echo=typer.echo)
    except FeatstoreError as exc:
        _fail(exc)


def _own_threads() -> contextlib.AbstractContextManager[object]:
    """dask computes on this process's threads, never on a distributed Client another
    caller left as the default (a clean-clone run once hung waiting on one)."""
    import dask

    return cast("contextlib.AbstractContextManager[object]", dask.config.set(scheduler="threads"))


@app.command()
def report(
    out: Path = typer.Option(
        Path("results"),
        help="Folder that `featstore probe --out` wrote; report.md/html land there.",
    ),
) -> None:
    """Write report.md, report.html and plots from the results in OUT."""
    try:
        from pipelines import report as stage

        with _own_threads():  # the report reads feature sets (examples, PCA maps)
            stage.run(out, echo=typer.echo)
    except FeatstoreError as exc:
        _fail(exc)


@app.command()
def compare(
    out: Path = typer.Option(Path("results"), help="Folder that `featstore probe --out` wrote."),
    reference: str = typer.Option(
        None, help="Encoder every other one is compared with (default: the first in results)."
    ),
    all_pairs: bool = typer.Option(False, "--all-pairs", help="Compare every pair instead."),
    adjust: str = typer.Option("holm", help="Multiple-comparison adjustment: holm or bh."),
) -> None:
    """Is A better than B? Paired tests on the kept predictions -> OUT/comparisons.csv."""
    if adjust not in ("holm", "bh"):
        _fail(ManifestError(f"--adjust {adjust!r}: use holm or bh"))
    try:
        from pipelines import compare as stage

        stage.run(out, reference, all_pairs, cast(Any, adjust), echo=typer.echo)
    except FeatstoreError as exc:
        _fail(exc)


@app.command("ls")
def ls(
    cache: str = typer.Argument(
        None,
        help=f"Feature-set folder or URL (default: $FEATSTORE_CACHE or {DEFAULT_CACHE}).",
    ),
) -> None:
    """List the feature sets in a cache folder."""
    import os

    from featstore.store.catalog import list_sets

    cache = cache or os.environ.get("FEATSTORE_CACHE", DEFAULT_CACHE)
    try:
        rows = list_sets(cache)
    except FeatstoreError as exc:
        _fail(exc)
    if not rows:
        typer.echo(f"no feature sets in {cache}")
        return
    cols = ["dataset", "encoder", "resolution", "items", "size_mb", "complete", "format", "key"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    typer.echo("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        if "error" in r:  # an unreadable set: its path and why, not a row of columns
            typer.echo(f"{r['path']}: unreadable ({r['error']})")
            continue
        typer.echo("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def _reachable_set(where: str) -> FeatureSet:
    """The set at `where` (a folder or a URL), once its cache answers."""
    from featstore.places import reachable
    from featstore.store.sets import FeatureSet

    fs = FeatureSet(where)
    reachable(fs.path)
    return fs


@app.command()
def serve(
    out: Path = typer.Option(Path("results"), help="Folder that `featstore probe --out` wrote."),
    cache: Path | None = typer.Option(
        None, help=f"Feature-set folder (default: $FEATSTORE_CACHE or {DEFAULT_CACHE})."
    ),
    host: str = typer.Option(
        "127.0.0.1", help="Address to bind; any but loopback needs the printed token."
    ),
    port: int = typer.Option(8765, min=1, max=65535, help="Port."),
) -> None:
    """Browse a cache and its results in a web browser (read-only; docs/serve.md)."""
    import os

    try:
        import uvicorn

        from featstore.serve.app import build_app, token_for
    except ImportError as exc:
        _fail(ManifestError(f"featstore serve needs the [serve] extra ({exc}): "
                            "pip install 'featstore[serve]'"))  # fmt: skip
    folder = cache or Path(os.environ.get("FEATSTORE_CACHE", DEFAULT_CACHE))
    for what, where in (("--cache", folder), ("--out", out)):
        if not where.is_dir():
            _fail(FileNotFoundError(f"{what} {where} is not a folder"))
    token = token_for(host)
    url = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    typer.echo(f"featstore serve: {folder} and {out}, read-only, at {url}")
    if token:
        typer.secho(
            f"bound to {host}, beyond this machine: every request needs the token {token}",
            fg=typer.colors.YELLOW,
        )
    uvicorn.run(build_app(out, folder, token), host=host, port=port, log_level="warning")


@app.command()
def info(where: str = typer.Argument(..., metavar="PATH")) -> None:
    """Print a feature set's attributes and variables (a folder or a URL)."""
    try:
        fs = _reachable_set(where)
        if not fs.exists():
            _fail(FileNotFoundError(f"{fs}: not a feature set (no zarr.json)"))
        typer.echo(json.dumps(fs.attrs, indent=2, default=str))
    except FeatstoreError as exc:
        _fail(exc)


@app.command()
def verify(path: str = typer.Argument(..., metavar="PATH")) -> None:
    """Decode every chunk of every array (checksums), check attributes against the
    recorded identity, marks and NaN/Inf; one FAIL line per problem, exit 1 on any."""
    try:
        problems = _reachable_set(path).verify()
    except FeatstoreError as exc:
        _fail(exc)
    for p in problems:
        typer.secho(f"FAIL {p}", fg=typer.colors.RED)
    if problems:
        raise typer.Exit(1)
    typer.echo(f"ok {path}")
