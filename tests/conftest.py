"""Shared fixtures: one project CA with party certificates, and an unrelated CA for refusal tests.

Certificates are made once per test session (ECDSA keys are cheap, but a
session-wide directory keeps every gRPC test on the same trust root).

Party ids and roles: "aggregator" and "client-<n>" get their default roles;
"server" and "client-x" have no default role ("server" is not a role and
"client-x" does not end in "-<digits>"), so they are issued as
"server:party" and "client-x:client".
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import hypothesis
import pytest

from securecollab.net.certs import TlsFiles, make_certs

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Test workers share the cores (make test runs two): one math thread each, as every protocol process has,
    # or OpenMP's spinning threads (torch, scikit-learn) oversubscribe them: one test ran 15x slower so.
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_var, "1")
    # Each worker (and every process it starts) picks the ports of its services from a part of the range of
    # its own: one worker's port, chosen but not yet bound by a service still starting, is not the other's.
    from securecollab.runs.training import PORT_SLICE_ENV
    _worker = os.environ["PYTEST_XDIST_WORKER"].removeprefix("gw")
    _workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")
    if _worker.isdigit() and _workers.isdigit():
        os.environ.setdefault(PORT_SLICE_ENV, f"{int(_worker) % int(_workers)}/{_workers}")

# Hypothesis fails an example that takes over 200 ms: timing is no property of the code under test, and one
# stall of this shared 2-core machine would fail the run. Tests that bound the time per example say so.
hypothesis.settings.register_profile("securecollab", deadline=None)
hypothesis.settings.load_profile("securecollab")

PARTIES = ["aggregator", "client-0", "client-1", "client-2", "client-3", "server:party", "client-x:client"]


@pytest.fixture(scope="session", autouse=True)
def data_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded data sets' splits are cached in a directory of this session (every process the tests
    start inherits it), so no test depends on a cache left by an earlier run."""
    from securecollab.data import CACHE_ENV
    d = tmp_path_factory.mktemp("data-cache")
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(d)
    yield d
    if previous is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture(scope="session")
def cert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directory with our CA (ca.pem/ca.key) and <party>.pem/<party>.key for every party in PARTIES."""
    d = tmp_path_factory.mktemp("certs")
    make_certs(d, PARTIES)
    return d


@pytest.fixture(scope="session")
def tls_for(cert_dir: Path) -> Callable[[str], TlsFiles]:
    """tls_for("client-0") -> TlsFiles of that party under our CA."""

    def _tls_for(party_id: str) -> TlsFiles:
        return TlsFiles.for_party(cert_dir, party_id)

    return _tls_for


@pytest.fixture(scope="session")
def other_ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second, unrelated CA issuing certs for the same party ids: none of them may be trusted by ours."""
    d = tmp_path_factory.mktemp("other-ca")
    make_certs(d, PARTIES)
    return d


CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def browser():
    """Headless Chromium (Debian's packages) driven by Selenium; skips where missing, unless CI requires it
    (SECURECOLLAB_REQUIRE_BROWSER=1)."""
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
