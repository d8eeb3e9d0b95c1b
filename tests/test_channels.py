"""Multi-channel inputs (issue 30): co-registered CT/PET as index columns and the
sequences of a 4D NIfTI, mapped to the encoder's channels by a `channels:` block.

Everything runs on synthetic phantoms written as real NIfTI files: no PET data
reaches this machine.
"""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import xarray as xr
from conftest import REPO
from transformers import AutoModel
from typer.testing import CliRunner

from featstore.data import readers
from featstore.data.manifest import Dataset, load_manifest
from featstore.data.settings import Channels, Intensity
from featstore.encode.preprocess import preprocess
from featstore.errors import BadInputError, ManifestError
from featstore.extraction.run import Options
from featstore.identity import Preprocess, requested
from pipelines import extract
from pipelines.cli import app

CT_WINDOW = {"mode": "window", "center": 40, "width": 400}
PET_WINDOW = {"mode": "window", "center": 5, "width": 10}
WIDE = {"mode": "window", "center": 40, "width": 1500}
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # the tiny DINOv3's own (conftest)


def _save(arr: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> Path:
    nib.save(nib.Nifti1Image(arr, affine), path)
    return path


def _phantoms(rng: np.random.Generator, shape=(32, 32, 3)) -> tuple[np.ndarray, np.ndarray]:
    """A CT in HU (int16) and a PET in SUV (float32) with known structure: a bright
    disc in CT, a hot spot elsewhere in PET."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    disc = ((yy - 10) ** 2 + (xx - 12) ** 2 < 36)[..., None]
    spot = ((yy - 22) ** 2 + (xx - 20) ** 2 < 16)[..., None]
    ct = np.where(disc, 300.0, 20.0) + rng.normal(scale=30, size=shape)
    pet = np.where(spot, 8.0, 1.0) * rng.lognormal(sigma=0.2, size=shape)
    return ct.round().astype(np.int16), pet.astype(np.float32)


def _petct_folder(root: Path, n: int = 6) -> Path:
    data = root / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        ct, pet = _phantoms(rng)
        _save(ct, data / f"s{i}_ct.nii")
        _save(pet, data / f"s{i}_pet.nii")
        rows.append(f"s{i}_ct.nii,s{i}_pet.nii,{i % 2},{('train', 'val', 'test')[i % 3]}")
    (data / "index.csv").write_text("ct,pet,label,split\n" + "\n".join(rows) + "\n")
    return data


def _channels(mode: str = "rgb", **kw) -> dict:
    inputs = [
        {"source": "ct", "intensity": CT_WINDOW},
        {"source": "pet", "intensity": PET_WINDOW},
    ]
    if mode == "rgb":
        inputs.append({"source": "ct", "intensity": WIDE})
    return {"mode": mode, "inputs": inputs, **kw}


def _dataset(data: Path, channels: dict | None, **kw) -> Dataset:
    args = dict(
        name="pc", format="nifti", path=data, index="index.csv", task="classification", dims=3
    )
    return Dataset(**{**args, **kw}, channels=channels)


def _manifest(root: Path, encoder: str, channels: str) -> Path:
    path = root / "m.yaml"
    path.write_text(
        f"cache: cache\nencoders: ['{encoder}']\nbaseline: null\nresolutions: [32]\n"
        "batch_size: 4\nunit_items: 8\n"
        "datasets:\n  - {name: pc, format: nifti, path: data, index: index.csv, "
        f"task: classification, dims: 3, channels: {channels}}}\n"
    )
    return path


def _extract(path: Path):
    (summary,) = extract.run(
        load_manifest(path), Options(progress=False, num_workers=0), echo=lambda *_: None
    )
    return xr.open_zarr(summary.path)


def _window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.clip((x.astype(np.float32) - (center - width / 2)) / width, 0, 1)


def _forward(model_dir: Path, pixels: np.ndarray) -> np.ndarray:
    model = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()


def _slices(arr: np.ndarray) -> np.ndarray:
    """(x, y, z) RAS+ volume -> (z, x, y) axial slices, as featstore items."""
    return np.moveaxis(arr, 2, 0)


def _normalise(rgb: np.ndarray) -> np.ndarray:
    """(n, 3, H, W) in [0, 1] -> encoder input with the tiny DINOv3's mean/std."""
    mean = np.asarray(MEAN, np.float32)[None, :, None, None]
    return ((rgb - mean) / np.asarray(STD, np.float32)[None, :, None, None]).astype(np.float32)


# ------------------------------------------------------------------ stored == forward


def test_stored_ct_pet_features_equal_a_forward_pass_of_the_tensor_built_here(
    tmp_path, tiny_dinov3
):
    data = _petct_folder(tmp_path)
    xs = _extract(_manifest(tmp_path, str(tiny_dinov3), str(_channels())))
    assert xs.attrs["preprocess"]["channels"]["mode"] == "rgb"
    # The three-channel tensor, built from the files with nibabel and numpy alone:
    # R = CT 40/400, G = PET SUV 0..10, B = CT 40/1500 (32 x 32: no resize).
    rgb = []
    for i in range(6):
        ct = _slices(np.asarray(nib.load(data / f"s{i}_ct.nii").dataobj))
        pet = _slices(np.asarray(nib.load(data / f"s{i}_pet.nii").dataobj))
        rgb.append(np.stack([_window(ct, 40, 400), _window(pet, 5, 10), _window(ct, 40, 1500)], 1))
    out = _forward(tiny_dinov3, _normalise(np.concatenate(rgb)))
    assert xs.sizes["item"] == len(out) == 18
    np.testing.assert_allclose(xs.cls.values, out[:, 0].astype(np.float16), rtol=0, atol=2e-3)
    patch = out[:, 3:].reshape(len(out), 4, 4, 32)  # 1 CLS + 2 registers dropped
    np.testing.assert_allclose(xs.patch.values, patch.astype(np.float16), rtol=0, atol=2e-3)


@pytest.mark.parametrize("combine", ["concat", "mean"])
def test_per_channel_features_are_each_grey_forward_joined(tmp_path, tiny_dinov3, combine):
    data = _petct_folder(tmp_path)
    xs = _extract(
        _manifest(tmp_path, str(tiny_dinov3), str(_channels("per-channel", combine=combine)))
    )
    ct = np.concatenate([_slices(np.asarray(nib.load(p).dataobj)) for p in
                         sorted(data.glob("s*_ct.nii"))])  # fmt: skip
    pet = np.concatenate([_slices(np.asarray(nib.load(p).dataobj)) for p in
                          sorted(data.glob("s*_pet.nii"))])  # fmt: skip
    grey = [_window(ct, 40, 400), _window(pet, 5, 10)]
    outs = [_forward(tiny_dinov3, _normalise(np.repeat(g[:, None], 3, 1)))[:, 0] for g in grey]
    want = np.concatenate(outs, -1) if combine == "concat" else (outs[0] + outs[1]) / 2
    assert xs.sizes["channel"] == (64 if combine == "concat" else 32)
    np.testing.assert_allclose(xs.cls.values, want.astype(np.float16), rtol=0, atol=3e-3)


# ------------------------------------------------------------------ preprocessing


def _pre(channels: dict) -> Preprocess:
    return Preprocess(32, Intensity(), MEAN, STD, channels=Channels(**channels))


def test_each_channel_window_applies_to_its_own_channel_only():
    ct, pet = _phantoms(np.random.default_rng(1))
    image = np.stack([_slices(ct), _slices(pet)], -1).astype(np.float32)  # sources ct, pet
    base, _ = preprocess(image, None, _pre(_channels()))
    other = _channels()
    other["inputs"][0]["intensity"] = {"mode": "window", "center": 300, "width": 100}
    changed, _ = preprocess(image, None, _pre(other))
    assert not np.array_equal(changed[:, 0], base[:, 0])
    np.testing.assert_array_equal(changed[:, 1:], base[:, 1:])  # PET and the wide CT kept
    other = _channels()
    other["inputs"][1]["intensity"] = {"mode": "minmax"}
    changed, _ = preprocess(image, None, _pre(other))
    np.testing.assert_array_equal(changed[:, [0, 2]], base[:, [0, 2]])
    # and each is that window of its own source, nothing else
    unit = base[:, 1] * STD[1] + MEAN[1]
    np.testing.assert_allclose(unit, _window(_slices(pet), 5, 10), atol=1e-6)


def test_per_channel_pixels_are_one_grey_input_per_channel():
    ct, pet = _phantoms(np.random.default_rng(2))
    image = np.stack([_slices(ct), _slices(pet)], -1).astype(np.float32)
    pixels, _ = preprocess(image, None, _pre(_channels("per-channel")))
    assert pixels.shape == (3, 6, 32, 32)
    unit = pixels * np.tile(STD, 2)[None, :, None, None] + np.tile(MEAN, 2)[None, :, None, None]
    for k in range(3):
        np.testing.assert_allclose(unit[:, k], _window(_slices(ct), 40, 400), atol=1e-6)
        np.testing.assert_allclose(unit[:, 3 + k], _window(_slices(pet), 5, 10), atol=1e-6)


# ------------------------------------------------------------------ 4D NIfTI


def _four_d(root: Path, axis: str, shape=(16, 12, 10), n_seq: int = 4) -> tuple[Dataset, list]:
    rng = np.random.default_rng(3)
    seqs = [rng.normal(100 * k, 10, shape).astype(np.float32) for k in range(n_seq)]
    stacked = np.stack(seqs, 0 if axis == "first" else -1)
    root.mkdir(parents=True, exist_ok=True)
    _save(stacked, root / "b.nii")
    (root / "index.csv").write_text("image,label,split\nb.nii,0,train\n")
    return root, seqs


def _seq_channels(sources=(3, 0, 2), **kw) -> dict:
    inputs = [{"source": s, "intensity": {"mode": "minmax"}} for s in sources]
    return {"mode": "rgb", "inputs": inputs, **kw}


@pytest.mark.parametrize("axis", ["first", "last"])
def test_4d_nifti_sequences_first_or_last_are_read_as_the_3d_volumes(tmp_path, axis):
    root, seqs = _four_d(tmp_path, axis)
    for declared in ("auto", axis):
        ds = _dataset(root, _seq_channels(sequence_axis=declared))
        (s,) = readers.list_samples(ds)
        got = readers.load(ds, s).image
        assert got.shape == (10, 16, 12, 3) and s.n_items == 10
        assert readers.header(ds, s).size == (16, 12)
        assert readers.header(ds, s).spacing == (3.0, 2.0, 2.0)
        for k, seq in enumerate((3, 0, 2)):  # channels are the distinct sources, in order
            np.testing.assert_array_equal(got[..., k], _slices(seqs[seq]))


def test_4d_nifti_reoriented_like_its_3d_sequences(tmp_path):
    """A flipped affine reorients every sequence as load_nifti does one 3D volume."""
    flip = np.diag([-2.0, 2.0, 3.0, 1.0])
    rng = np.random.default_rng(4)
    seqs = [rng.normal(size=(10, 6, 4)).astype(np.float32) for _ in range(3)]
    _save(np.stack(seqs, -1), tmp_path / "b.nii", flip)
    (tmp_path / "index.csv").write_text("image,label,split\nb.nii,0,train\n")
    ds = _dataset(tmp_path, _seq_channels((0, 1, 2)))
    (s,) = readers.list_samples(ds)
    got = readers.load(ds, s).image
    for k in range(3):
        _save(seqs[k], tmp_path / f"s{k}.nii", flip)
        (tmp_path / "index.csv").write_text(f"image,label,split\ns{k}.nii,0,train\n")
        one = _dataset(tmp_path, None)
        (t,) = readers.list_samples(one)
        np.testing.assert_array_equal(got[..., k], readers.load(one, t).image[..., 0])


def test_ambiguous_4d_axis_is_refused_and_a_declared_one_read(tmp_path):
    root, seqs = _four_d(tmp_path, "last", shape=(4, 12, 5))  # first 4, last 4: both could be
    with pytest.raises(BadInputError, match=r"b\.nii: a 4D volume of shape \(4, 12, 5, 4\) "
                       r"whose sequence axis is ambiguous.*sequence_axis: first"):  # fmt: skip
        readers.list_samples(_dataset(root, _seq_channels()))
    ds = _dataset(root, _seq_channels(sequence_axis="last"))
    (s,) = readers.list_samples(ds)
    np.testing.assert_array_equal(readers.load(ds, s).image[..., 1], _slices(seqs[0]))


def test_a_missing_sequence_names_the_file_and_its_shape(tmp_path):
    root, _ = _four_d(tmp_path, "last", n_seq=3)
    expected = r"b\.nii: the 4D volume holds 3 sequence\(s\) along its last axis \(shape "
    with pytest.raises(BadInputError, match=expected + r"16x12x10x3\).*sequence\(s\) \[3\]"):
        readers.list_samples(_dataset(root, _seq_channels()))


def test_a_3d_file_for_sequence_sources_is_refused(tmp_path):
    _save(np.zeros((8, 8, 4), np.float32), tmp_path / "b.nii")
    (tmp_path / "index.csv").write_text("image,label,split\nb.nii,0,train\n")
    with pytest.raises(BadInputError, match=r"b\.nii: shape \(8, 8, 4\) is not a 4D volume"):
        readers.list_samples(_dataset(tmp_path, _seq_channels()))


# ------------------------------------------------------------------ spatial mismatches


def test_different_grids_are_refused_naming_both_files_and_shapes(tmp_path):
    data = _petct_folder(tmp_path, n=3)
    _save(np.zeros((32, 30, 3), np.float32), data / "s1_pet.nii")
    with pytest.raises(BadInputError, match=r"s1_pet\.nii: grid \(32, 30, 3\) differs from "
                       r".*s1_ct\.nii \(32, 32, 3\).*never resamples"):  # fmt: skip
        readers.list_samples(_dataset(data, _channels()))


def test_affines_beyond_the_tolerance_are_refused_within_it_accepted(tmp_path):
    data = _petct_folder(tmp_path, n=3)
    pet = np.asarray(nib.load(data / "s2_pet.nii").dataobj).copy()  # the file is rewritten
    moved = AFFINE.copy()
    moved[0, 3] = 4.0  # 4 mm off
    _save(pet, data / "s2_pet.nii", moved)
    with pytest.raises(BadInputError, match=r"s2_pet\.nii: affine .* differs from .*s2_ct\.nii"
                       r" .* by up to 4 mm"):  # fmt: skip
        readers.list_samples(_dataset(data, _channels()))
    assert len(readers.list_samples(_dataset(data, _channels(affine_tolerance=5)))) == 3
    moved[0, 3] = 1e-5  # float rounding of a resampled header
    _save(pet, data / "s2_pet.nii", moved)
    assert len(readers.list_samples(_dataset(data, _channels()))) == 3


# ------------------------------------------------------------------ manifest, identity


@pytest.mark.parametrize(
    ("channels", "extra", "expected"),
    [
        ({"inputs": [{"source": "ct"}, {"source": "pet"}]}, {}, "exactly 3 inputs"),
        (
            {"mode": "per-channel", "inputs": [{"source": "ct"}, {"source": 1}]},
            {},
            "not both",
        ),
        ({**_channels(), "combine": "mean"}, {}, "`mode: per-channel` only"),
        ({**_channels(), "sequence_axis": "first"}, {}, "sequence-index sources"),
        (_channels(), {"intensity": CT_WINDOW}, "drop the dataset's `intensity:`"),
        (_channels(), {"format": "images", "dims": 2}, "format 'images' holds one image"),
        ({"mode": "per-channel", "inputs": [{"source": "c t"}]}, {}, "name an index column"),
    ],
)
def test_bad_channel_blocks_are_manifest_errors(tmp_path, channels, extra, expected):
    import yaml

    (tmp_path / "data").mkdir()
    entry = {"name": "pc", "format": "nifti", "path": "data", "index": "index.csv",
             "task": "classification", "dims": 3, "channels": channels, **extra}  # fmt: skip
    (tmp_path / "index.csv").write_text("ct,pet,label\n")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"datasets": [entry]}))
    with pytest.raises(ManifestError, match=re.escape(expected)):
        load_manifest(path)


def test_a_dumped_manifest_with_channels_validates_again(tmp_path):
    """run-config.json keeps the manifest as dumped (every field set); it must load."""
    from featstore.data.manifest import Manifest

    _petct_folder(tmp_path, n=3)
    m = load_manifest(_manifest(tmp_path, "pixels:8", str(_channels("per-channel"))))
    again = Manifest.model_validate_json(m.model_dump_json())
    assert again.datasets[0].channels == m.datasets[0].channels


def test_the_channel_mapping_is_in_the_identity(tmp_path):
    data = _petct_folder(tmp_path, n=3)
    m = load_manifest(_manifest(tmp_path, "pixels:8", str(_channels())))
    keys = set()
    variants = (_channels(), _channels("per-channel"), _channels("per-channel", combine="mean"))
    for channels in variants:
        ds = _dataset(data, channels)
        prep = readers.prepare(ds)
        req = requested(ds, m, prep.fingerprint, "pixels:8", 32).request()
        assert req["channels"]["mode"] == channels["mode"]
        keys.add(str(req))
    assert len(keys) == 3
    plain = requested(_dataset(data, None), m, "fp", "pixels:8", 32).request()
    assert "channels" not in plain  # single-image sets keep their keys
    # which file feeds which source is in the data's fingerprint, not only which files
    before = readers.prepare(_dataset(data, _channels())).fingerprint
    index = data / "index.csv"
    lines = index.read_text().splitlines()
    swapped = [",".join([*reversed(r.split(",")[:2]), *r.split(",")[2:]]) for r in lines[1:]]
    index.write_text("\n".join([lines[0], *swapped]) + "\n")
    assert readers.prepare(_dataset(data, _channels())).fingerprint != before


# ------------------------------------------------------------------ hostile inputs

CLI = CliRunner()


def _half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: _half(d / "s1_pet.nii"), r"s1_pet\.nii: cannot read NIfTI"),
        (lambda d: (d / "s1_pet.nii").unlink(), r"pet .*s1_pet\.nii does not exist"),
        (
            lambda d: (d / "index.csv").write_text("ct,label,split\ns0_ct.nii,0,train\n"),
            r"index lacks column\(s\) \['pet'\]",
        ),
        (
            lambda d: (d / "index.csv").write_text("ct,pet,label,split\ns0_ct.nii,,0,train\n"),
            r"line 2: the pet cell is empty",
        ),
        (
            lambda d: _save(np.full((32, 32, 3), np.nan, np.float32), d / "s1_pet.nii"),
            r"s1_pet\.nii: \d+ NaN/Inf values",
        ),
        (
            lambda d: (d / "s1_pet.nii").write_bytes(b"not a nifti at all" * 40),
            r"s1_pet\.nii: cannot read NIfTI",
        ),
    ],
    ids=["truncated", "missing", "no-column", "empty-cell", "nan", "foreign"],
)
def test_hostile_channel_files_are_refused_by_the_cli(tmp_path, damage, expected):
    data = _petct_folder(tmp_path, n=3)
    path = _manifest(tmp_path, "pixels:8", str(_channels()))
    damage(data)
    result = CLI.invoke(app, ["extract", "--manifest", str(path), "--workers", "0"])
    assert result.exit_code == 2, result.output
    assert re.search(expected, result.output) and "Traceback" not in result.output, result.output


def test_hostile_4d_volume_is_refused_by_the_cli(tmp_path):
    root, _ = _four_d(tmp_path / "data", "last")
    _half(root / "b.nii")
    path = _manifest(tmp_path, "pixels:8", str(_seq_channels()))
    result = CLI.invoke(app, ["extract", "--manifest", str(path), "--workers", "0"])
    assert result.exit_code == 2, result.output
    assert "b.nii" in result.output and "Traceback" not in result.output, result.output


# ------------------------------------------------------------------ the PET/CT study


def test_petct_phantom_manifest_extracts_and_probes(tmp_path):
    """manifests/petct-phantom.yaml, made tiny: CT alone, PET alone, CT+PET (and the
    per-channel variant) through `featstore extract` and `featstore probe`."""
    text = (REPO / "manifests" / "petct-phantom.yaml").read_text()
    text = text.replace("n: 24, size: 64, slices: 16", "n: 8, size: 32, slices: 4")
    text = text.replace("cache: ../cache/features", "cache: cache\nbaseline: null")
    text = text.replace("path: ../data/petct-phantom", "path: data/petct")
    path = tmp_path / "m.yaml"
    path.write_text(text)
    args = ["--manifest", str(path), "--encoder", "pixels:8", "--resolution", "64"]
    done = CLI.invoke(app, ["extract", *args, "--workers", "0"])
    assert done.exit_code == 0, done.output
    out = tmp_path / "results"
    probed = CLI.invoke(app, ["probe", *args, "--out", str(out)])
    assert probed.exit_code == 0, probed.output
    # the report re-reads the manifest as run-config.json dumped it
    reported = CLI.invoke(app, ["report", "--out", str(out)])
    assert reported.exit_code == 0, reported.output
    assert "## petct-ctpet" in (out / "report.md").read_text()
    import pandas as pd

    rows = pd.read_csv(out / "results.csv")
    names = {"petct-ct", "petct-pet", "petct-ctpet", "petct-per-channel"}
    assert set(rows.dataset) == names
    dice = rows[rows.metric == "dice"]
    assert set(dice.dataset) == names and dice.value.between(0, 1).all()
    opened = [xr.open_zarr(p) for p in (tmp_path / "cache").glob("*.zarr")]
    sets = {x.attrs["dataset"]["name"]: x for x in opened}
    assert len(sets) == len(opened) == 4
    assert sets["petct-per-channel"].sizes["channel"] == 2 * sets["petct-ct"].sizes["channel"]
    assert "channels" not in sets["petct-ct"].attrs["preprocess"]


def test_petct_phantoms_are_co_registered_nifti_with_known_structure(tmp_path):
    from featstore.data.settings import Synthetic
    from featstore.data.synthetic import generate

    out = generate(Synthetic(kind="petct3d", n=6, size=32, slices=8, seed=0), tmp_path / "p")
    lines = (out / "index.csv").read_text().splitlines()
    assert lines[0] == "image,ct,pet,mask,patient" and len(lines) == 7
    hot, faint = [], []
    for line in lines[1:]:
        _, ct_name, pet_name, mask_name, _ = line.split(",")
        ct, pet, mask = (nib.load(out / n) for n in (ct_name, pet_name, mask_name))
        assert ct.shape == pet.shape == mask.shape == (32, 32, 8)
        np.testing.assert_array_equal(ct.affine, pet.affine)
        assert ct.get_data_dtype() == np.int16 and pet.get_data_dtype() == np.float32
        lesion = np.asarray(mask.dataobj) == 1
        if lesion.any():
            suv = np.asarray(pet.dataobj)
            hu = np.asarray(ct.dataobj).astype(np.float64)
            hot.append(suv[lesion].mean())
            faint.append(abs(hu[lesion].mean() - 52))
    assert hot and min(hot) > 4  # lesions are hot in PET ...
    assert max(faint) < 10  # ... and soft tissue (52 HU, the body 40) in CT
