# The two commands of the README, and what they need.
#   make reproduce   the main job: the study's four CIFAR-10 experiments and REPORT.md
#   make test        the test suite (builds first)
# Both set up a local venv (.venv) on first use. TORCH_SPEC pins the torch that lies on this
# project's machines' disk; elsewhere any torch >= 2.4 works: make TORCH_SPEC="torch torchvision"
VENV       ?= .venv
PY         := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
DEPS       := numpy ninja pybind11 pytest hypothesis matplotlib tqdm setuptools wheel
SOURCES    := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/cuda/*)

.PHONY: venv build test reproduce bench bench-quick clean

venv: $(VENV)/.installed
$(VENV)/.installed:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_SPEC) $(DEPS)
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import fastbn, json; print(json.dumps(fastbn.build_info()))"
	touch $@

test: build
	$(PY) -m pytest -q tests

reproduce: build
	$(PY) -m fastbn.train reproduce $(ARGS)

bench: build
	$(PY) -m benchmarks.run $(ARGS)

bench-quick: build
	$(PY) -m benchmarks.run --quick $(ARGS)

clean:
	rm -rf build *.egg-info fastbn/_C*.so $(VENV)/.built
