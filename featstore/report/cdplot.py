"""Critical-difference diagram of encoders ranked over datasets (matplotlib; no torch).

Drawn by scikit-posthocs' `critical_difference_diagram`, chosen over autorank and a
hand-drawn figure because it takes exactly what `featstore.probing.ranks.Ranking`
holds (mean ranks and a matrix of adjusted pairwise p-values), joins encoders that
are not significantly different by crossbars computed from that matrix (so the bars
follow our Wilcoxon-Holm tests, not Nemenyi's), draws onto an Axes we own (no pyplot
state), and works with the installed numpy 2 / pandas 3 / matplotlib 3.11. Autorank
would rerun its own tests (and pick them itself). scikit-posthocs imports statsmodels
and seaborn, about 2 s, so it is imported only when a diagram is drawn.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from featstore.probing.ranks import Ranking
from featstore.report.tables import save_figure


def plot_critical_difference(ranking: Ranking, path: Path, *, title: str = "") -> bool:
    """Mean ranks on an axis (1 = best, at the left), crossbars joining encoders whose
    Holm-adjusted Wilcoxon p-value is >= `ranking.alpha`, and Nemenyi's critical
    difference as a bar above the axis. Returns whether the PNG at `path` was written
    (False: it already held these bytes)."""
    import scikit_posthocs as sp  # heavy (statsmodels, seaborn): only when drawing

    names = list(ranking.names)
    ranks = pd.Series(ranking.mean_ranks, index=names)
    sig = pd.DataFrame(ranking.wilcoxon_holm, index=names, columns=names)
    fig = Figure(figsize=(7, 1.2 + 0.28 * len(names)))
    ax = fig.add_subplot()
    sp.critical_difference_diagram(ranks, sig, ax=ax, alpha=ranking.alpha, cd=ranking.nemenyi_cd)
    ax.set_title(
        title
        or f"Mean rank over {ranking.n_datasets} datasets (Friedman p = "
        f"{ranking.friedman_p:.3g}; bars: Wilcoxon-Holm p >= {ranking.alpha:g})",
        fontsize=9,
        pad=16,  # room for the critical-difference bar's label
    )
    fig.tight_layout()
    return save_figure(fig, path)
