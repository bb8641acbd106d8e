# The two commands at the top of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
# torch is pinned to the CPU build that lies on this kind of machine; a bare `torch` would pull CUDA.
TORCH_PIN ?= torch==2.13.0
DEMO_OUT ?= build/demo

.PHONY: install install-test demo test bench clean

install:
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e .

install-test:
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[test]"

demo: install
	mkdir -p $(DEMO_OUT)
	modelpress compress examples/digits-mlp.onnx --recipe prune-int8 --data examples/digits.npz \
		--output $(DEMO_OUT)/digits-mlp.compressed.onnx --report-json $(DEMO_OUT)/report.json \
		--report-md $(DEMO_OUT)/report.md --force

test: install-test
	$(PYTHON) -m pytest

bench: install-test
	$(PYTHON) benchmarks/compare_int8.py

clean:
	rm -rf build .pytest_cache
