"""The extract stage: every cell of a manifest -> complete feature sets, one line each.

featstore extract --manifest data_manifest.yaml
"""

from __future__ import annotations

from collections.abc import Callable

from featstore.data.manifest import Manifest
from featstore.extraction.run import Options, Summary, extract_manifest
from featstore.store.location import place, reachable
from featstore.store.sets import Status


def run(
    manifest: Manifest,
    opts: Options = Options(),
    *,
    baseline: bool = True,
    cluster: str | None = None,
    scheduler: str | None = None,
    echo: Callable[[str], object] = print,
) -> list[Summary]:
    """Extract (or find, or finish) every feature set; print a line per set and a tally.

    `cluster` ("local:N") or `scheduler` (an address) run the units as dask tasks. A
    cache that cannot be written fails before anything starts.
    """
    if cluster is None and scheduler is None:
        summaries = extract_manifest(manifest, opts, baseline=baseline, echo=echo)
    else:
        from featstore.extraction.cluster import client_for, extract_on_cluster

        reachable(place(manifest.cache), write=True)  # before a cluster is started
        with client_for(cluster, scheduler, opts.threads or 1, opts.device) as client:
            summaries = extract_on_cluster(manifest, client, opts, baseline=baseline, echo=echo)
    for line in tally(summaries):
        echo(line)
    return summaries


STATUSES: tuple[Status, ...] = ("new", "resumed", "repaired", "cached")
SHOWN = 20  # samples left out named one per line; the rest are counted


def tally(summaries: list[Summary]) -> list[str]:
    """The closing lines: every sample left out (once per dataset, with its reason;
    past SHOWN, a count) and `done: ...` counting sets by status and those samples."""
    left: dict[tuple[str, str], str] = {}
    for s in summaries:
        for sample, reason in s.skipped.items():
            left.setdefault((s.dataset, sample), reason)
    lines = [f"left out {ds} / {sample}: {why}" for (ds, sample), why in list(left.items())]
    if len(lines) > SHOWN:
        lines = [*lines[:SHOWN], f"left out ... and {len(lines) - SHOWN} more"]
    counts = {k: sum(s.status == k for s in summaries) for k in STATUSES}
    done = ", ".join(f"{n} {k}" for k, n in counts.items())
    return [*lines, f"done: {done}, {len(left)} samples skipped"]
