# Two entry points for a fresh machine with Python 3.11: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-fast test-ffmpeg clean

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

# The tests that run ffmpeg, with the binary FFMPEG names (CI: the imageio-ffmpeg wheel's,
# after `make test` ran them with the system one).
FFMPEG_TESTS := tests/test_keyframes.py tests/test_audio_features.py tests/test_shard.py
test-ffmpeg: $(STAMP)
	@test -n "$(FFMPEG)" || { echo "usage: make test-ffmpeg FFMPEG=/path/to/ffmpeg"; exit 2; }
	$(FFMPEG) -version | sed -n 1p
	MMTOK_FFMPEG="$(FFMPEG)" $(BIN)/pytest -q -m "not slow" $(FFMPEG_TESTS)

clean:
	rm -rf $(VENV) demo-out
