# bitalloc: `make demo` sets everything up and runs the main job on the bundled demo model;
# `make test` sets everything up and runs the test suite. Both only need python3 (>= 3.10).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DEMO   ?= out/demo
# The CPU build of torch; an unpinned torch would pull gigabytes of CUDA packages.
TORCH  ?= torch==2.13.0

.PHONY: install demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/python examples/build_demo_model.py $(DEMO)
	$(BIN)/allocate $(DEMO)/model --budget 3.0bpp --calib $(DEMO)/data/calib.txt --calib-tokens 16384 \
		--save-scores $(DEMO)/scores.safetensors -o $(DEMO)/plan-3.0.json
	$(BIN)/bitalloc quantize $(DEMO)/model --plan $(DEMO)/plan-3.0.json --method gptq --calib $(DEMO)/data/calib.txt \
		--calib-tokens 16384 -o $(DEMO)/model-3.0bpp --overwrite
	$(BIN)/bitalloc eval $(DEMO)/model-3.0bpp --text $(DEMO)/data/heldout.txt
	$(BIN)/bitalloc eval $(DEMO)/model --plan $(DEMO)/plan-3.0.json --text $(DEMO)/data/heldout.txt
	$(BIN)/bitalloc eval $(DEMO)/model --bits 3 --text $(DEMO)/data/heldout.txt
	$(BIN)/bitalloc eval $(DEMO)/model --text $(DEMO)/data/heldout.txt

test: install
	$(BIN)/python -m pytest -q

# Every number in benchmarks/RESULTS.md (about an hour on 2 cores; needs ../shared).
SHARED ?= ../shared
bench: install
	for m in llama-dense-16m qwen3moe-20m; do \
		$(BIN)/python benchmarks/compare_baselines.py $(SHARED)/models/$$m \
			--calib $(SHARED)/data/python-calib.txt.xz --heldout $(SHARED)/data/python-heldout.txt.xz && \
		$(BIN)/python benchmarks/compare_solvers.py $(SHARED)/models/$$m \
			--calib $(SHARED)/data/python-calib.txt.xz --heldout $(SHARED)/data/python-heldout.txt.xz && \
		$(BIN)/python benchmarks/sensitivity_families.py $(SHARED)/models/$$m --repeat-truth \
			--calib $(SHARED)/data/python-calib.txt.xz --heldout $(SHARED)/data/python-heldout.txt.xz \
		|| exit 1; done
	$(BIN)/python benchmarks/solver_scaling.py

clean:
	rm -rf $(VENV) out *.egg-info
