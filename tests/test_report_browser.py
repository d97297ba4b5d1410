"""report.html in a real headless browser (Chromium from Debian's packages, driven by Selenium): the tables
render, every image loads, nothing goes to the console as an error. A screenshot is left in the test's
directory. The `browser` fixture (tests/conftest.py) skips where Chromium is missing (`make test` installs
it when it may); CI sets SECURECOLLAB_REQUIRE_BROWSER=1, so there it fails instead."""

from __future__ import annotations

from securecollab.pipeline import build_and_write_scorecard
from securecollab.plans import FedAvgPlan
from tests.test_report import card_with_figure


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
