"""How to probe: one frozen `ProbeOptions`, checked once where it is made.

The CLI, the Python API and the manifest's `protocol:` build one `ProbeOptions`; every
layer below takes it whole, so no option is renamed, re-validated or threaded through
signatures one argument at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from pydantic import ValidationError

from featstore.data.settings import LabelEfficiency
from featstore.errors import ProbeError

Pool = Literal["mean", "max", "cls+patch", "abmil"]  # 3D volume pooling (`--pool`)
Protocol = Literal["default", "medmnist+", "seed"]
POOLS: tuple[str, ...] = get_args(Pool)
PROTOCOLS: tuple[str, ...] = get_args(Protocol)


@dataclass(frozen=True)
class ProbeOptions:
    """Options of one probe run (`featstore probe`, `featstore.probe`).

    pool: how slice features of a 3D volume become one vector ("abmil" is trained).
    seed: of every probe fit and of the bootstrap intervals.
    protocol: "default"; "medmnist+" scores kNN as MedMNIST+ does (k=11, Euclidean);
        "seed" trains the paper's linear layer and runs kNN per label.
    memory_mb: None keeps each probe's arrays in memory; a number bounds what kNN,
        the streamed linear segmentation head and segmentation scoring hold at once.
    baseline: also probe the raw-pixel baseline of every dataset.
    curve: label-efficiency points for every set (None: each dataset's or study's
        `label_efficiency:` from the manifest, if any).
    seeds: refit the trainable probes (`seeds.trainable`) with each of these seeds too
        (`featstore probe --seeds 0,1,2,3,4`): rows per seed and their mean. The
        ordinary fit is `seed`'s, the lowest (a seed in `seeds` equal to it is reused).
    """

    pool: Pool = "mean"
    seed: int = 0
    protocol: Protocol = "default"
    memory_mb: float | None = None
    baseline: bool = True
    curve: LabelEfficiency | None = None
    seeds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ProbeError(f"pool {self.pool!r}: give one of {', '.join(POOLS)}")
        if self.protocol not in PROTOCOLS:
            raise ProbeError(f"protocol {self.protocol!r}: give one of {', '.join(PROTOCOLS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ProbeError(f"seed {self.seed!r}: give a whole number >= 0")
        bad = [s for s in self.seeds if isinstance(s, bool) or not isinstance(s, int) or s < 0]
        if bad or len(set(self.seeds)) != len(self.seeds):
            raise ProbeError(
                f"seeds {list(self.seeds)!r}: give distinct whole numbers >= 0, e.g. 0,1,2,3,4"
            )
        if self.seeds and min(self.seeds) < self.seed:
            raise ProbeError(
                f"seeds {list(self.seeds)!r} go below seed {self.seed}, the ordinary fit's: "
                "a table shows the lowest seed's rows; give seeds >= seed (or seed=0)"
            )
        if self.memory_mb is not None and not self.memory_mb > 0:
            raise ProbeError(f"memory_mb {self.memory_mb!r}: give a positive number of MB")


def curve_options(
    fractions: Sequence[float] = (), shots: Sequence[int] = (), repeats: int | None = None
) -> LabelEfficiency | None:
    """`--fractions/--shots/--repeats` (or the API's arguments) as a checked
    `LabelEfficiency`; None when neither fractions nor shots are given. `repeats`
    None is 1; 0 or fewer is refused (as `--repeats` is), never read as 1."""
    if repeats is not None and (isinstance(repeats, bool) or repeats < 1):
        raise ProbeError(f"repeats {repeats!r}: give a whole number >= 1 (draws per curve point)")
    if not fractions and not shots:
        if repeats is not None:
            raise ProbeError(
                "repeats go with fractions or shots, e.g. --fractions 0.1,1 --repeats 5"
            )
        return None
    try:
        return LabelEfficiency(
            fractions=tuple(fractions),
            shots=tuple(shots),
            repeats=1 if repeats is None else repeats,
        )
    except ValidationError as exc:
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        raise ProbeError(f"label efficiency: {reasons}") from None
