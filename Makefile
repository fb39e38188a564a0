# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	# Kaldi fbank reference for the parity tests; its wheel pins another torch, so no deps.
	$(BIN)/python -m pip install -q --no-deps torchaudio==2.11.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mmtok demo --out demo-out

test: $(STAMP)
	$(BIN)/pytest -q

# Everything but the slow end-to-end tests, for local iteration.
test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

clean:
	rm -rf $(VENV) demo-out
