# Two commands for a fresh machine:
#   make demo   set up .venv and generate an image with the model sdlite ships (offline, seconds)
#   make test   set up .venv with the test extras and run the test suite
#   make lint   ruff: pyflakes rules, import order, a complexity bound (config in pyproject.toml)
# torch is pinned by constraints.txt: 2.13.0 (CPU build), 2.9.1 on aarch64 (bench/arm64/README.md); it pins
# every other package too.

PYTHON ?= python3
VENV ?= .venv
PIP = $(VENV)/bin/pip
PROMPT ?= a red circle on a blue background
PIP_INSTALL = $(PIP) install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: demo test lint venv venv-test clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) torch   # the pin (per architecture) comes from constraints.txt
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test]'
	touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

demo: venv
	$(VENV)/bin/sdlite generate "$(PROMPT)" -o demo.png --seed 1 -v

test: venv-test
	$(VENV)/bin/python -m pytest

lint: venv-test
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) demo.png
