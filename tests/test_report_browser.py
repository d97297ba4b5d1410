"""report.html in a real headless browser (Chromium from Debian's packages, driven by Selenium): the tables
render, every image loads, nothing goes to the console as an error. A screenshot is left in the test's
directory. Skips where Chromium is missing (`make test` installs it when it may); CI sets
SECURECOLLAB_REQUIRE_BROWSER=1, so there it fails instead."""

from __future__ import annotations

import os
import shutil

import pytest

from securecollab.pipeline import build_and_write_scorecard
from securecollab.plans import FedAvgPlan
from tests.test_report import card_with_figure

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("SECURECOLLAB_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium/chromedriver missing: run scripts/ensure-browser as root")
        pytest.skip("chromium/chromedriver missing: run scripts/ensure-browser as root")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_report_renders_its_tables_and_every_image_in_a_browser(browser, tmp_path):
    results_dir = tmp_path / "results"
    card = card_with_figure(results_dir)
    results = {name: card["protocols"][name] for name in ("centralized", "fedavg")}
    build_and_write_scorecard(results, FedAvgPlan(), results_dir, attacks=card["attacks"])
    browser.get((results_dir / "report.html").as_uri())
    count = "return document.querySelectorAll(arguments[0]).length"
    assert browser.execute_script(count, "#protocols tbody tr") == 2
    assert browser.execute_script(count, "#attacks tbody tr") == 2
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight])")
    assert [alt for alt, *_ in images] == ["costs.png", "attacks/leakage.png"]
    assert all(done and width > 0 and height > 0 for _, done, width, height in images), images
    # the escaped markup shows as text; no script ran, nothing was logged as an error
    assert "<script>alert(1)</script>" in browser.find_element("id", "attacks").text
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
    assert browser.save_screenshot(str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
