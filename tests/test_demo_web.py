"""`securecollab demo-web` as a person uses it: a real HE server process, the demo-web client process serving
its page, and headless Chromium clicking and drawing on it. The oracle for every prediction the page shows
is a separate HE client's decrypted argmax for the same 8x8 image, over the same server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import numpy as np
import pytest
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from securecollab.launch import ProcessGroup, ensure_certs, securecollab_cmd
from securecollab.net.certs import TlsFiles
from securecollab.plans import HEModelPlan
from securecollab.runs.inference import CLIENT, PLAIN_CLIENT, prepare, start_server
from services.he_client import HEClient

pytestmark = pytest.mark.slow
LOGIT_TOL = 0.05


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An HE server (two session slots), the page's client process, and an oracle HE client holding the
    other slot: {"page": url, "oracle": HEClient, "ds", "group", "target", "certs"}."""
    work = tmp_path_factory.mktemp("demo-web")
    _, ds, weights, certs = prepare(HEModelPlan(), work)
    with ProcessGroup(work / "logs") as group:
        port = start_server(group, HEModelPlan(), weights, certs, None, max_batch=1, max_sessions=2)
        target = f"localhost:{port}"
        web = start_page(group, "demo-web", target, certs)
        with HEClient(target, tls=TlsFiles.for_party(certs, PLAIN_CLIENT), party_id=PLAIN_CLIENT) as oracle:
            oracle.open_session()
            yield {"page": f"http://127.0.0.1:{web}", "oracle": oracle, "ds": ds, "group": group,
                   "target": target, "certs": certs}


def start_page(group: ProcessGroup, name: str, target: str, certs, party: str = CLIENT) -> int:
    return group.start_service(name, securecollab_cmd("demo-web", "--target", target, "--certs", str(certs),
                                                      "--id", party, "--examples", "12", "--connect-timeout", "3"))


def call(url: str, body=None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def oracle_logits(served, pixels) -> np.ndarray:
    return served["oracle"].infer(np.asarray(pixels, dtype=np.float32).reshape(1, 8, 8))


def test_the_api_refuses_bad_input_clearly_and_keeps_serving(served):
    url = served["page"] + "/api/classify"
    bad = [({"pixels": [0.5] * 63}, "64 values"), ({"pixels": [0.5] * 63 + [float("nan")]}, "finite"),
           ({"pixels": [2.0] * 64}, "[0, 1]"), ({"pixels": ["a"] * 64}, "list of numbers"),
           ({"pixels": [0.5] + [10 ** 400] + [0] * 62}, "finite"),  # an integer no float can hold
           ({"index": 12}, "[0, 12)"), ({"index": True}, "integer"), ([1, 2], "JSON object")]
    for body, words in bad:
        code, reply = call(url, body)
        assert code == 400 and words in reply["error"], (body, code, reply)
    assert call(url, raw=b"{not json")[0] == 400
    assert call(url, raw=b"0" * (2 << 20))[0] == 413
    code, reply = call(url, {"index": 0})
    assert code == 200 and reply["prediction"] == int(oracle_logits(served, reply["pixels"]).argmax())


def test_a_picked_test_image_is_classified_encrypted_as_the_oracle_says(served, browser, tmp_path):
    browser.get(served["page"])
    ready(browser)
    browser.find_element(By.CSS_SELECTOR, '.example[data-index="5"]').click()
    result = classify(browser)
    ds = served["ds"]
    np.testing.assert_array_equal(np.asarray(result["pixels"], dtype=np.float32), ds.x_test[5].reshape(-1))
    expected = oracle_logits(served, result["pixels"])
    assert result["prediction"] == int(expected.argmax())
    assert result["plain"] == int(expected.argmax())  # the plain API agrees on this image
    assert "test image #5" in browser.find_element(By.ID, "source").text
    shown = [float(td.text) for td in browser.find_elements(By.CSS_SELECTOR, "#logits tr td:nth-child(2)")]
    assert np.abs(np.asarray(shown) - expected).max() <= LOGIT_TOL
    costs = browser.find_element(By.ID, "costs").text
    assert "ciphertext sent" in costs and "KB" in costs and "server evaluation" in costs
    assert browser.save_screenshot(str(tmp_path / "demo-web-picked.png"))
    assert_no_console_errors(browser)


def test_a_drawn_digit_is_classified_encrypted_as_the_oracle_says(served, browser, tmp_path):
    browser.set_window_size(1300, 900)  # the README's screenshot (docs/demo-web.png) is this test's
    browser.get(served["page"])
    ready(browser)
    pad = browser.find_element(By.ID, "pad")
    # a "7": a bar across the top, then a stroke down to the bottom left (offsets from the pad's centre)
    (ActionChains(browser).move_to_element_with_offset(pad, -70, -80).click_and_hold()
     .move_by_offset(70, 0).move_by_offset(70, 0)
     .move_by_offset(-40, 60).move_by_offset(-40, 60).move_by_offset(-30, 40).release().perform())
    result = classify(browser)
    pixels = np.asarray(result["pixels"])
    assert pixels.shape == (64,) and 0 < pixels.min() + pixels.max() and pixels.max() <= 1.0
    assert "your drawing" in browser.find_element(By.ID, "source").text
    assert result["prediction"] == int(oracle_logits(served, pixels).argmax())
    assert result["prediction"] == 7  # the downsampling draws digits the way the data set has them
    path = tmp_path / "demo-web.png"
    assert browser.save_screenshot(str(path)) and path.read_bytes()[:4] == b"\x89PNG"
    assert_no_console_errors(browser)


def test_the_page_says_when_the_he_server_is_down_or_refuses(served, browser):
    group, certs = served["group"], served["certs"]
    # refused: the server's two session slots are taken (the first page's and the oracle's)
    ensure_certs(certs, ["client-2"])
    refused = start_page(group, "demo-web-refused", served["target"], certs, party="client-2")
    code, reply = call(f"http://127.0.0.1:{refused}/api/status")
    assert code == 502 and "refused: RESOURCE_EXHAUSTED" in reply["error"], reply
    # a second page of the same client takes the first page's slot; the first opens a new session and goes on
    start_page(group, "demo-web-again", served["target"], certs)
    code, reply = call(served["page"] + "/api/classify", {"index": 1})
    assert code == 200 and reply["prediction"] == int(oracle_logits(served, reply["pixels"]).argmax()), reply
    # down: nothing listens at the target
    down = start_page(group, "demo-web-down", "localhost:9", served["certs"])
    code, reply = call(f"http://127.0.0.1:{down}/api/classify", {"index": 0})
    assert code == 503 and "not reachable" in reply["error"], reply
    browser.get(f"http://127.0.0.1:{down}")
    WebDriverWait(browser, 60).until(lambda b: "Not connected" in b.find_element(By.ID, "status").text)
    assert "not reachable" in browser.find_element(By.ID, "status").text
    assert not browser.find_element(By.ID, "classify").is_enabled()


def ready(browser) -> None:
    WebDriverWait(browser, 120).until(
        lambda b: b.find_element(By.ID, "status").get_attribute("data-ready") == "1"
        or "Not connected" in b.find_element(By.ID, "status").text)
    assert browser.find_element(By.ID, "status").get_attribute("data-ready") == "1", \
        browser.find_element(By.ID, "status").text
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".example"))


def classify(browser) -> dict:
    """Click "Classify encrypted", wait for the answer; what the page shows."""
    button = browser.find_element(By.ID, "classify")
    WebDriverWait(browser, 10).until(lambda b: button.is_enabled())
    browser.execute_script('document.getElementById("prediction").removeAttribute("data-value")')
    button.click()
    WebDriverWait(browser, 120).until(
        lambda b: b.find_element(By.ID, "prediction").get_attribute("data-value") is not None
        or b.find_element(By.ID, "error").text)
    assert browser.find_element(By.ID, "error").text == ""
    view = browser.find_element(By.ID, "model-view")
    return {"prediction": int(browser.find_element(By.ID, "prediction").get_attribute("data-value")),
            "plain": int(browser.find_element(By.ID, "plain-prediction").get_attribute("data-value")),
            "pixels": json.loads(view.get_attribute("data-pixels"))}


def assert_no_console_errors(browser) -> None:
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
