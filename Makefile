# Two commands on a fresh clone: `make demo` and `make test`. Each creates the virtual environment and
# installs everything first (only once; re-run when pyproject.toml / requirements.txt change).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast lint bench clean tiny-clip

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	command -v chromium >/dev/null || command -v chromium-headless-shell >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || \
		echo "warning: could not install chromium (the report's browser test will be skipped)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/clipcap demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not integration and not slow"

lint: setup
	$(VENV)/bin/ruff check clipcap_core pipelines jobs tests benchmarks infra

bench: setup
	$(PY) benchmarks/embed.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/caption.py

# The aligned tiny CLIP shipped in clipcap_core/resources (tiny.safetensors + model card tiny.md): synthetic
# shards -> `train-clip` (Ray Train, fixed seeds) -> fp16 weights -> zero-shot figures on unseen images.
tiny-clip: setup
	$(PY) -m pipelines.tiny_clip

clean:
	rm -rf data .pytest_cache
