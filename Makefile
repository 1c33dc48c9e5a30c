# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
QEMU_DIR := $(VENV)/qemu
PYTEST_ARGS ?= -n 2

.PHONY: demo test lint format bench clean qemu

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/graphopt demo

test: $(STAMP) qemu
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Debian's qemu-user-static, so tests/test_qdq_emulated_avx2.py can run ONNX Runtime on an
# emulated CPU without VNNI (tests/emulated_cpu.py); best effort: without it those tests skip.
qemu:
	@test -x $(QEMU_DIR)/usr/bin/qemu-x86_64-static || ( mkdir -p $(QEMU_DIR) && cd $(QEMU_DIR) \
	  && timeout 300 apt-get download qemu-user-static >/dev/null 2>&1 \
	  && dpkg -x qemu-user-static_*.deb . && rm -f qemu-user-static_*.deb \
	  && find usr ! -type d ! -name qemu-x86_64-static -delete ) \
	  || echo "qemu: not fetched (needs apt-get and dpkg); the emulated-CPU tests will skip"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/fold_bn.py

clean:
	rm -rf $(VENV) build dist *.egg-info graphopt-demo
