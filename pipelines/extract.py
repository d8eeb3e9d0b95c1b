"""The extract stage: every cell of a manifest -> complete feature sets, one line each.

featstore extract --manifest data_manifest.yaml
"""

from __future__ import annotations

from collections.abc import Callable

from featstore.data.manifest import Manifest
from featstore.extraction.run import Options, Summary, extract_manifest, runner_for


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
    runner = runner_for(opts, cluster, scheduler)
    return extract_manifest(manifest, opts, runner, baseline=baseline, echo=echo)
