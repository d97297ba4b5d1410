# One command sets everything up and runs the demo; one runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup demo demo-full demo-web test browser check-protos protos clean

setup: $(VENV)/.installed

# torch first, pinned: the CPU build; anything unpinned would pull a CUDA build.
# crypten 0.4.1 declares broken dependencies (the dead `sklearn` package and a
# torchvision that drags another torch), so it goes in with --no-deps; its
# real needs are listed in pyproject.toml.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps crypten==0.4.1
	touch $@

# The main job: every protocol and every attack, quick settings (minutes on 2 cores).
demo: setup
	$(BIN)/securecollab demo --quick

# The thorough scorecard: full rounds and full attack sweeps (about 1.5 h on 2 cores; see the README).
demo-full: setup
	$(BIN)/securecollab demo

# Encrypted inference in the browser: a local HE server, and this machine's client serving the page on :8000.
demo-web: setup
	$(BIN)/securecollab demo-web

# Two workers, whole test files each (a file's deployments are shared by its tests): many tests wait on
# processes and sockets, so two overlap well on 2 cores.
test: setup browser
	$(BIN)/pytest -q -n 2 --dist loadfile --durations=25

# Headless Chromium for the browser tests (installed when root; else those tests skip).
browser:
	scripts/ensure-browser

check-protos: setup
	scripts/check-protos

protos: setup
	scripts/gen-protos

clean:
	rm -rf $(VENV) results .pytest_cache
