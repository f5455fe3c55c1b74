# Two commands on a fresh clone: `make demo` and `make test`. Each creates the virtual environment and
# installs everything first (only once; re-run when pyproject.toml / requirements.txt change).
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

LOCK_PY := 3.11
LOCK_FLAGS := pyproject.toml --extra dev --generate-hashes --python-version $(LOCK_PY) \
              --python-platform x86_64-manylinux_2_28 --no-annotate --no-header -o requirements.lock

.PHONY: setup demo test test-faults test-slow test-fast lint bench clean lock audit tiny-clip tiny-scenes-clip \
        tiny-scenes-gapped-clip

setup: $(STAMP)

# requirements.lock pins every package of the environment with its sha256 hashes (pip's hash-checking mode:
# a tampered or substituted wheel fails the install). It is for CPython 3.11 on x86_64 Linux; elsewhere set
# NO_LOCK=1 to install from pyproject.toml's ranges instead.
$(STAMP): pyproject.toml requirements.txt requirements.lock
	command -v chromium >/dev/null || command -v chromium-headless-shell >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) || \
		echo "warning: could not install chromium (the report's browser test will be skipped)"
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
ifeq ($(NO_LOCK),)
	$(PY) -m pip install --require-hashes -r requirements.lock
	$(PY) -m pip install --no-deps -e .
else
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install -e ".[dev]"
endif
	touch $(STAMP)

# One command to refresh the lock after editing pyproject.toml (keeps existing pins; UPGRADE=1 takes the newest).
lock: setup
	$(VENV)/bin/uv pip compile $(LOCK_FLAGS) $(if $(UPGRADE),--upgrade,)

# Known-vulnerability audit of the locked set. pip-audit needs its advisory source (PyPI / OSV) online; no
# offline snapshot of it is installable from the package registries, so this is a manual / CI-with-network step.
# --strict: a package the advisory source does not know fails the audit (without it pip-audit skips it and
# still prints "No known vulnerabilities found", which on 2026-12-02 here was true of 0 of 195 packages).
audit: setup
	$(PY) -m pip install -q pip-audit
	$(VENV)/bin/pip-audit --strict --require-hashes --disable-pip -r requirements.lock

demo: setup
	$(VENV)/bin/clipcap demo

test: setup
	$(PY) -m pytest -q

# The cluster-scale fault tests (node kills on a 3-node local cluster, a flaky + restarted S3): ~3 minutes on a
# quiet 2-core VM and many times that under load, so they are kept out of `make test` (addopts -m 'not faults').
test-faults: setup
	$(PY) -m pytest -q -m faults tests/faults

# The slow end-to-end tests (nightly nights, killed-and-rerun caption / embed job / 2-worker training, sweep,
# DeCap and demo training, GPT-2-small-sized reference checkpoints): ~12 minutes, kept out of `make test`.
test-slow: setup
	$(PY) -m pytest -q -m slow

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
	$(PY) -m pipelines.clip.tiny

# The two CLIPs of the `scenes` world (clipcap_core/scenes.py), shipped beside tiny (<name>.safetensors + card
# <name>.md): `tiny-scenes` (learned temperature) and `tiny-scenes-gapped` (fixed temperature 0.01 from a
# cone-shaped init: a modality gap near a real CLIP's). Scenes shards in hard-negative twins -> `train-clip` (each
# twin pair in one batch) -> fp16 -> zero-shot and gap figures. Ray runs its workers at nice 15: on a busy machine RAY_worker_niceness=0 keeps them at make's niceness.
tiny-scenes-clip: setup
	$(PY) -m pipelines.clip.tiny_scenes --variant tiny-scenes

tiny-scenes-gapped-clip: setup
	$(PY) -m pipelines.clip.tiny_scenes --variant tiny-scenes-gapped

clean:
	rm -rf data .pytest_cache
