# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The local CPU build of torch; installed first so pip never reaches for a CUDA build.
TORCH_PIN := torch==2.13.0

# The optional second environment with the real frameworks (integration tests, benchmarks
# against the real peers): torch 2.14.1 + torchvision 0.29.1 from local disk, ultralytics,
# yolov5 (packaged ultralytics/yolov5 v7.0). detloss is used from src/ (PYTHONPATH), not installed.
INT_VENV ?= .venv-int
INT_PY := $(INT_VENV)/bin/python
INT_TORCH := torch==2.14.1 torchvision==0.29.1
INT_PKGS := ultralytics==8.4.190 yolov5==7.0.14 "setuptools<81" scipy pytest hypothesis
# The DETR benchmark's peer: Hugging Face transformers' ports of DETR's and RT-DETR's criteria
# (their loss modules need none of transformers' optional dependencies).
INT_HF := transformers==5.24.0 huggingface_hub==1.33.0 safetensors regex
INT_ENV := PYTHONPATH=$(CURDIR)/src:$(CURDIR)/benchmarks

.PHONY: demo test venv bench venv-int test-integrations bench-peers clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/detloss train

test: $(VENV)/.installed
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/run.py all

$(INT_VENV)/.installed:
	$(PYTHON) -m venv $(INT_VENV)
	$(INT_VENV)/bin/pip install -q $(INT_TORCH)
	$(INT_VENV)/bin/pip install -q $(INT_PKGS)
	$(INT_VENV)/bin/pip install -q --no-deps $(INT_HF) || echo "transformers not installed: the DETR benchmark runs without that peer"
	touch $@

venv-int: $(INT_VENV)/.installed

# Tests against the real frameworks (integration_tests/, outside the main suite).
test-integrations: $(INT_VENV)/.installed
	$(INT_ENV) $(INT_PY) -m pytest -q -p no:cacheprovider integration_tests

# Every benchmark row against the real peer's code, in the same process.
bench-peers: $(INT_VENV)/.installed
	$(INT_ENV) $(INT_PY) benchmarks/run.py all --peers

clean:
	rm -rf $(VENV) $(INT_VENV) runs .pytest_cache
