"""Batches: items of volumes that span batches and units arrive in order; bad samples are named."""

from __future__ import annotations

import numpy as np
import torch

from featstore.data import readers
from featstore.data.manifest import Dataset
from featstore.data.settings import Intensity, Synthetic
from featstore.encode.preprocess import preprocess
from featstore.extraction.batches import Batches, plan_batches
from featstore.identity import Preprocess
from featstore.store import schema


def _volumes(tmp_path, n: int = 6, slices: int = 5):
    ds = Dataset(
        name="v",
        format="synthetic",
        synthetic=Synthetic(kind="cls3d", n=n, size=16, slices=slices),
        path=tmp_path / "v",
        task="classification",
        dims=3,
        splits={"ratios": [0.5, 0.25, 0.25]},
    )
    prep = readers.prepare(ds)
    layout = schema.Layout(
        n_items=n * slices,
        chunk_items=6,  # units of 6 items: every unit boundary cuts a volume
        channels=8,
        layers=1,
        rows=1,
        cols=1,
        mask_size=0,
        n_classes=0,
        dtype="float16",
    )
    pre = Preprocess(16, Intensity(mode="minmax"), (0.5,) * 3, (0.25,) * 3)
    return prep, layout, pre


def test_plan_never_straddles_units(tmp_path):
    _prep, layout, _ = _volumes(tmp_path)
    batches = plan_batches(layout, list(range(layout.n_units)), 4)
    assert batches[:3] == [(0, 0, 4), (0, 4, 6), (1, 6, 10)]
    assert [b[0] for b in batches] == sorted(b[0] for b in batches)
    covered = [i for _, a, b in batches for i in range(a, b)]
    assert covered == list(range(layout.n_items))  # every item once, in order


def test_volumes_spanning_batches_arrive_slice_by_slice(tmp_path):
    prep, layout, pre = _volumes(tmp_path)
    units = [1, 3]  # a resumed run: only some units
    feed = Batches(prep, pre, layout, plan_batches(layout, units, 4))
    got = torch.cat([feed[k].pixels for k in range(len(feed))]).numpy()
    expected = np.concatenate(
        [preprocess(readers.load(prep.ds, s).image, None, pre)[0] for s in prep.samples]
    )
    rows = [i for u in units for i in range(*layout.unit_slice(u).indices(layout.n_items))]
    np.testing.assert_array_equal(got, expected[rows])
    assert [feed[k].unit for k in range(len(feed))] == [1, 1, 3, 3]


def test_an_unreadable_volume_is_named_and_zeroed(tmp_path):
    prep, layout, pre = _volumes(tmp_path)
    bad = prep.samples[1]
    with open(bad.image, "r+b") as f:
        f.truncate(400)  # header intact, voxels cut: decoding fails
    feed = Batches(prep, pre, layout, plan_batches(layout, [0, 1], 6))
    first, second = feed[0], feed[1]
    # items 5..9 are the second volume: unit 0 holds its first slice, unit 1 the rest
    assert list(first.errors) == [bad.id] and list(second.errors) == [bad.id]
    assert "cannot read NIfTI" in first.errors[bad.id]
    assert not first.pixels[5].any() and first.pixels[:5].any()
    assert not second.pixels[:4].any() and second.pixels[4:].any()
