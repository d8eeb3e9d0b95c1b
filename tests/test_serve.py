"""featstore serve through Starlette's TestClient: what it shows equals what the test
computes from the set's arrays and the kept predictions; what it refuses is a clean
4xx; it writes nothing, even to a read-only copy of a cache."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("starlette", reason="featstore serve needs the [serve] extra")
from starlette.testclient import TestClient

from featstore.report.tables import pca_rgb
from featstore.serve.app import build_app, is_loopback, token_for
from featstore.serve.neighbours import Index
from featstore.store.sets import FeatureSet


def _client(study: Path, token: str | None = None) -> TestClient:
    return TestClient(build_app(study / "out", study / "cache", token))


def _sets(study: Path) -> dict[str, Path]:
    """encoder name -> set folder."""
    return {
        FeatureSet(p).attrs["encoder"]["name"]: p for p in sorted((study / "cache").glob("*.zarr"))
    }


def _key(folder: Path) -> str:
    return str(FeatureSet(folder).attrs["cache_key"])[:12]


def cosine_neighbours(cls: np.ndarray, item: int, k: int) -> list[int]:
    """Neighbours computed here, independently: float64, full sort, ties by index."""
    x = cls.astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x[item]
    order = sorted((i for i in range(len(x)) if i != item), key=lambda i: (-sim[i], i))
    return order[:k]


def kept_failures(parquet: Path) -> list[str]:
    """The wrong test units of a kept prediction file, most confident first, by pandas."""
    df = pd.read_parquet(parquet)
    scores = df[[c for c in df.columns if c.startswith("score_")]].to_numpy()
    df["conf"] = scores[np.arange(len(df)), df.predicted.to_numpy()]
    wrong = df[df.predicted != df.label].sort_values(["conf", "sample"], ascending=[False, True])
    return wrong["sample"].tolist()


def test_overview_lists_every_set_with_its_state_and_scores(served_study):
    c = _client(served_study)
    page = c.get("/")
    assert page.status_code == 200
    listed = {s["encoder"]: s for s in c.get("/api/sets").json()}
    assert set(listed) == {"pixels:4", "pixels:8"}
    assert {s["state"] for s in listed.values()} == {"complete"}
    results = pd.read_csv(served_study / "out" / "results.csv")
    for enc, folder in _sets(served_study).items():
        assert listed[enc]["key"] == _key(folder) and listed[enc]["items"] == 24
        row = results[(results.encoder == enc) & (results.probe == "linear")]
        value = row[row.metric == "auroc"].value.iloc[0]
        assert f"linear auroc {value:.3f}" in page.text


def test_neighbours_equal_cosine_neighbours_of_the_sets_cls(served_study):
    c = _client(served_study)
    for folder in _sets(served_study).values():
        cls = np.asarray(FeatureSet(folder).open().cls.values, np.float32)
        for item in (0, 7, 23):
            got = c.get(f"/api/sets/{_key(folder)}/neighbours/{item}?k=5").json()
            assert [n["item"] for n in got["neighbours"]] == cosine_neighbours(cls, item, 5)
            sims = [n["similarity"] for n in got["neighbours"]]
            assert sims == sorted(sims, reverse=True) and sims[0] <= 1 + 1e-6


def test_index_leaves_out_unusable_rows_and_breaks_ties_by_index():
    x = np.array([[1, 0], [1, 0], [0, 1], [np.nan, 1], [1, 0]], np.float32)
    index = Index(x)
    assert [n.item for n in index.query(0, 4)] == [1, 4, 2]  # NaN row never returned
    with pytest.raises(ValueError, match="no readable CLS"):
        index.query(3, 2)


def test_failures_equal_the_kept_predictions_sorted(served_study):
    c = _client(served_study)
    for folder in _sets(served_study).values():
        key = _key(folder)
        got = c.get(f"/api/sets/{key}/failures").json()
        assert set(got) == {"linear", "knn"}
        for probe, rows in got.items():
            want = kept_failures(served_study / "out" / "predictions" / f"c2-{key}-{probe}.parquet")
            assert [r["sample"] for r in rows] == want
        html = c.get(f"/set/{key}/failures").text
        assert html.count("class='failure'") == sum(len(r) for r in got.values())
    a, b = (_key(f) for f in _sets(served_study).values())
    versus = c.get(f"/api/sets/{a}/failures?versus={b}").json()["versus"]["linear"]
    assert set(versus) == {"only_this_right", "only_other"}


def test_items_pages_and_feature_maps(served_study):
    c = _client(served_study)
    folder = _sets(served_study)["pixels:4"]
    key, xs = _key(folder), FeatureSet(folder).open()
    items = c.get(f"/api/sets/{key}/items").json()["items"]
    assert [i["label"] for i in items] == xs.label.values.tolist()
    assert {i["split"] for i in items} == {"train", "val", "test"}
    tests = [i for i in items if i["split"] == "test"]
    assert all(i["predicted"] is not None for i in tests)
    for url in (f"/set/{key}", f"/set/{key}/item/3"):
        assert c.get(url).status_code == 200
    for fit in ("image", "test"):
        png = c.get(f"/img/{key}/3/pca.png?fit={fit}")
        assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    assert c.get(f"/img/{key}/3/pca.png?fit=other").status_code == 400
    example = int(xs.example_item.values[0])
    assert c.get(f"/img/{key}/{example}/tile.png").status_code == 200


def test_pca_fitted_on_the_image_itself_is_the_default():
    rng = np.random.default_rng(0)
    patch = rng.normal(size=(1, 4, 4, 8))
    np.testing.assert_allclose(pca_rgb(patch, patch), pca_rgb(patch))
    other = rng.normal(size=(5, 4, 4, 8))
    assert not np.allclose(pca_rgb(patch, other), pca_rgb(patch))


def _edited_copy(src: Path, cache: Path, key: str, **attrs: object) -> Path:
    dest = cache / f"{key[:24]}.zarr"
    shutil.copytree(src, dest)
    meta = json.loads((dest / "zarr.json").read_text())
    meta["attributes"].update(cache_key=key, **attrs)
    (dest / "zarr.json").write_text(json.dumps(meta))
    return dest


def test_refusals_are_clean_4xx_never_a_traceback(served_study, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(served_study, study)
    src = _sets(study)["pixels:4"]
    _edited_copy(src, study / "cache", "a" * 64, complete=False)
    _edited_copy(src, study / "cache", "b" * 64, featstore_format=1)
    outside = tmp_path / "elsewhere"
    shutil.copytree(src, outside / "x.zarr")
    (study / "cache" / f"{'c' * 24}.zarr").symlink_to(outside / "x.zarr")
    (outside / "secret.png").write_bytes(b"not yours")
    (study / "out" / "link.png").symlink_to(outside / "secret.png")
    c = _client(study)
    states = {s["key"]: s["state"] for s in c.get("/api/sets").json()}
    assert states["a" * 12] == "partial" and states["b" * 12] == "other-format"
    assert "c" * 12 not in states  # the link out of the cache is not listed
    cases = {
        "/results/link.png": 403,  # a symlink out of the results folder
        "/results/%2e%2e/elsewhere/secret.png": 403,
        "/results/..%2f..%2fetc%2fpasswd": 403,
        "/results/manifest.yaml": 404,
        f"/api/sets/{'a' * 12}/items": 409,  # half-written
        f"/set/{'a' * 12}": 409,
        f"/api/sets/{'b' * 12}/items": 409,  # another format version
        f"/api/sets/{'c' * 12}/items": 404,  # a symlink out of the cache
        "/api/sets/0123456789ab/items": 404,  # unknown key
        "/set/..%2f..%2fetc": 404,
        "/api/sets/not-a-key/neighbours/0": 404,
        f"/api/sets/{_key(src)}/neighbours/999": 404,
        f"/api/sets/{_key(src)}/neighbours/x": 400,
        "/static/../app.py": 404,
    }
    for url, status in cases.items():
        r = c.get(url)
        assert r.status_code == status, (url, r.text)
        assert "Traceback" not in r.text and 'File "' not in r.text
        if url.startswith("/api/"):
            assert r.json()["error"]
    assert "partial" in c.get(f"/api/sets/{'a' * 12}/items").json()["error"]
    assert "another featstore format" in c.get(f"/api/sets/{'b' * 12}/items").json()["error"]


def test_a_damaged_chunk_is_an_error_on_that_item_not_a_crash(served_study, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(served_study, study)
    folder = _sets(study)["pixels:4"]
    key = _key(folder)
    for name in ("patch", "cls"):
        chunk = next(p for p in (folder / name / "c").rglob("*") if p.is_file())
        data = bytearray(chunk.read_bytes())
        data[len(data) // 2] ^= 0xFF
        chunk.write_bytes(bytes(data))
    c = _client(study)
    example = int(FeatureSet(folder).open().example_item.values[0])
    pca = c.get(f"/img/{key}/3/pca.png")
    assert pca.status_code == 422 and "damaged" in pca.json()["error"]
    assert c.get(f"/img/{key}/{example}/tile.png").status_code == 200  # its thumbnail reads
    near = c.get(f"/api/sets/{key}/neighbours/3")
    assert near.status_code == 422 and "no readable CLS" in near.json()["error"]
    assert c.get("/").status_code == 200 and c.get(f"/api/sets/{key}/items").status_code == 200


def test_a_token_guards_every_request_beyond_loopback(served_study):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    assert token_for("127.0.0.1") is None
    token = token_for("0.0.0.0")
    assert token and len(token) >= 24 and token != token_for("0.0.0.0")
    c = _client(served_study, token)
    assert c.get("/").status_code == 403 and c.get("/api/sets").status_code == 403
    assert c.get("/api/sets?token=wrong").status_code == 403
    assert c.get(f"/?token={token}").status_code == 200
    assert c.get("/api/sets").status_code == 200  # the cookie it set
    fresh = _client(served_study, token)
    assert fresh.get("/api/sets", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def test_every_page_on_a_read_only_copy_writes_nothing(served_study, tmp_path):
    # chmod a-w stops a writer that is not root; the listing (sizes, mtimes, names)
    # before and after catches a write even where the tests run as root.
    study = tmp_path / "ro"
    shutil.copytree(served_study, study)
    for p in [study, *study.rglob("*")]:
        if not p.is_symlink():
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    before = _tree(study)
    try:
        c = _client(study)
        keys = [s["key"] for s in c.get("/api/sets").json()]
        urls = ["/", "/api/sets", "/results/results.csv"]
        for key in keys:
            urls += [f"/set/{key}", f"/set/{key}/item/2", f"/set/{key}/failures"]
            urls += [f"/api/sets/{key}/items", f"/api/sets/{key}/neighbours/2"]
            urls += [f"/api/sets/{key}/failures", f"/img/{key}/2/tile.png"]
            urls += [f"/img/{key}/2/pca.png?fit=test"]
        for url in urls:
            assert c.get(url).status_code == 200, url
        assert _tree(study) == before
    finally:
        for p in [study, *study.rglob("*")]:
            if not p.is_symlink():
                p.chmod(p.stat().st_mode | stat.S_IWUSR)
