"""featstore serve in a real browser: uvicorn on a free loopback port, the system's
headless chromium driven by selenium. What explorer.js renders equals what the test
computes from the set's arrays and the kept predictions; images load; the console
stays clean. FEATSTORE_SCREENSHOTS=1 also saves the docs' screenshots (docs/img/)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette", reason="featstore serve needs the [serve] extra")
pytest.importorskip("uvicorn", reason="featstore serve needs the [serve] extra")
pytest.importorskip("selenium", reason="the browser test needs selenium (the dev extra)")
import uvicorn
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from test_serve import _key, _sets, cosine_neighbours, kept_failures

from featstore.serve.app import build_app
from featstore.store.sets import FeatureSet

DOCS_IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
WAIT = 15  # s for the page's script to render; a healthy page takes well under 1 s


@pytest.fixture(scope="module")
def url(served_study: Path) -> Iterator[str]:
    """The app over `served_study`, served by uvicorn in a thread on 127.0.0.1."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race for it
    port = sock.getsockname()[1]
    app = build_app(served_study / "out", served_study / "cache")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("uvicorn did not start serving the test study")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(WAIT)
    sock.close()


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.skip("no chromium/chromedriver on PATH: `make browser` installs Debian's")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1000,1350"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(options=options, service=Service(chromedriver))
    d.set_page_load_timeout(WAIT)
    yield d
    d.quit()


def _severe(driver: Any) -> list[str]:
    """The console's errors since the last call (chromium keeps the log per session)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _loaded(driver: Any, images: list[Any]) -> list[int]:
    """naturalWidth of each <img>, after waiting for all of them to finish loading."""
    WebDriverWait(driver, WAIT).until(
        lambda d: all(d.execute_script("return arguments[0].complete", i) for i in images)
    )
    return [int(driver.execute_script("return arguments[0].naturalWidth", i)) for i in images]


def _screenshot(driver: Any, name: str) -> None:
    if os.environ.get("FEATSTORE_SCREENSHOTS") == "1":
        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(DOCS_IMG / name)), name


def test_pages_render_the_neighbours_and_failures_the_arrays_give(url, driver, served_study):
    folders = _sets(served_study)
    mine, other = folders["pixels:4"], folders["pixels:8"]
    key, partner = _key(mine), _key(other)

    driver.get(f"{url}/")
    rows = driver.find_elements(By.CSS_SELECTOR, "tr.set")
    assert {r.get_attribute("data-key") for r in rows} == {key, partner}
    driver.find_element(By.CSS_SELECTOR, f"tr.set[data-key='{key}'] a[href='/set/{key}']").click()

    # the item grid, drawn by explorer.js from /api/sets/KEY/items
    WebDriverWait(driver, WAIT).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#grid a.item"))
    tiles = driver.find_elements(By.CSS_SELECTOR, "#grid a.item")
    assert len(tiles) == 24 and driver.find_element(By.ID, "count").text == "24 items"
    assert min(_loaded(driver, driver.find_elements(By.CSS_SELECTOR, "#grid img"))) > 0
    test_only = driver.find_element(By.ID, "f-split")
    test_only.find_element(By.CSS_SELECTOR, "option[value='test']").click()
    n_test = int((FeatureSet(mine).open().split.values.astype(str) == "test").sum())
    assert driver.find_element(By.ID, "count").text == f"{n_test} items"

    # click an item: its neighbours in both encoders, side by side
    first = driver.find_element(By.CSS_SELECTOR, "#grid a.item")
    item = int(first.get_attribute("data-item"))
    first.click()
    for side in ("side-a", "side-b"):
        WebDriverWait(driver, WAIT).until(
            lambda d, s=side: d.find_element(By.ID, s).get_attribute("data-loaded") == "1"
        )
    assert driver.find_element(By.ID, "partner").get_attribute("value") == partner
    for side, folder in (("side-a", mine), ("side-b", other)):
        cls = np.asarray(FeatureSet(folder).open().cls.values, np.float32)
        shown = driver.find_elements(By.CSS_SELECTOR, f"#{side} li.neighbour")
        assert [int(li.get_attribute("data-item")) for li in shown] == cosine_neighbours(
            cls, item, 8
        ), side
        assert min(_loaded(driver, driver.find_elements(By.CSS_SELECTOR, f"#{side} img"))) > 0
    maps = [driver.find_element(By.ID, i) for i in ("pca-image", "pca-test")]
    assert min(_loaded(driver, maps)) > 0
    _screenshot(driver, "serve-neighbours.png")

    # the failure cases: the kept predictions' wrong test units, most confident first
    driver.get(f"{url}/set/{key}/failures")
    for probe in ("linear", "knn"):
        rows = driver.find_elements(By.CSS_SELECTOR, f"section[data-probe='{probe}'] tr.failure")
        want = kept_failures(served_study / "out" / "predictions" / f"c2-{key}-{probe}.parquet")
        assert want and [r.get_attribute("data-sample") for r in rows] == want, probe
    assert min(_loaded(driver, driver.find_elements(By.CSS_SELECTOR, "img.mini"))) > 0
    _screenshot(driver, "serve-failures.png")
    assert _severe(driver) == []


def test_an_unknown_item_shows_its_error_and_nothing_else_breaks(url, driver, served_study):
    key = _key(_sets(served_study)["pixels:4"])
    _severe(driver)  # start from an empty log
    driver.get(f"{url}/set/{key}/item/999")
    assert "items 0..23, not 999" in driver.find_element(By.ID, "error").text
    errors = _severe(driver)  # the page's own 404, and nothing from the script
    assert len(errors) == 1 and "404" in errors[0], errors
