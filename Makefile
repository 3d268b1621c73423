# The two commands a new user needs: `make demo` and `make test`.
# Everything else (the virtual environment, torch, the project) is set up by them.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   := torch==2.13.0

.PHONY: install test test-fast lint demo bench clean browser lmms-eval FORCE

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: the project's own range (torch>=2.6) is then already met,
	# so pip never reaches for a multi-GB CUDA build.
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[hf,eval,plot,dev,serve,lora,quant,ui,curate,ray]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

# The web UI's test (tests/test_ui_browser.py) drives Debian's Chromium through its chromedriver.
# As root (CI on a fresh machine) missing ones are installed with apt-get; as any other user
# this only warns, and that test then FAILS with the same advice: it is never skipped.
BROWSER_PKGS := chromium chromium-driver

browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing $(BROWSER_PKGS) for the web UI test"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(BROWSER_PKGS); \
	else \
		echo "warning: chromium/chromedriver missing and not root: tests/test_ui_browser.py will fail;" \
		     "install them with: sudo apt-get install -y $(BROWSER_PKGS)" >&2; \
	fi

# lmms-eval (public benchmarks) in its own environment, .venv-lmms: lmms-eval's declared
# dependencies clash with ours (av<16, torchvision, wandb==0.25.0, ...) and weigh gigabytes. The
# environment reads LMMS_BASE's packages (torch, PyAV, tokenizers, ...) through a .pth line and adds
# lmms-eval without its dependencies, the pinned few its evaluation path imports
# (requirements-lmms.txt), and this checkout, whose entry point registers `--model videollama`.
# Its own pip is the base's (python -m pip): no pip or setuptools copy shadows the base's.
LMMS_VENV  := .venv-lmms
LMMS_BASE  ?= $(VENV)
LMMS_STAMP := $(LMMS_VENV)/.installed
LMMS_SITE   = $$($(LMMS_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# Rebuilt when LMMS_BASE names another environment than last time.
$(LMMS_VENV)/.base: FORCE
	@mkdir -p $(LMMS_VENV)
	@echo '$(abspath $(LMMS_BASE))' | cmp -s - $@ || echo '$(abspath $(LMMS_BASE))' > $@

$(LMMS_STAMP): requirements-lmms.txt pyproject.toml $(LMMS_VENV)/.base $(if $(filter $(VENV),$(LMMS_BASE)),$(STAMP))
	find $(LMMS_VENV) -mindepth 1 -maxdepth 1 ! -name .base -exec rm -rf {} +
	$(LMMS_BASE)/bin/python -m venv --without-pip $(LMMS_VENV)
	$(LMMS_BASE)/bin/python -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_paths()["purelib"])' \
		> "$(LMMS_SITE)/_videollama_base.pth"
	$(LMMS_VENV)/bin/python -m pip install -q --no-deps --ignore-installed -r requirements-lmms.txt
	$(LMMS_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(LMMS_STAMP)

lmms-eval: $(LMMS_STAMP)

test: $(STAMP) lint browser lmms-eval
	$(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(BIN)/python -m videollama.demo

bench: $(STAMP)
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) $(LMMS_VENV) runs build *.egg-info

FORCE:
