# Two commands do everything: `make demo` (the whole pipeline on the embedded default) and
# `make test`. Both set up a local virtual environment on first use. Bring your own environment
# with `make demo PYTHON=python` (it must already have requirements.txt installed).
PYTHON ?= .venv/bin/python
RUN ?= runs/demo
SETUP := $(if $(filter .venv/bin/python,$(PYTHON)),.venv/.installed,)

.PHONY: demo test setup clean
setup: $(SETUP)

# The venv sees an already-installed torch (--system-site-packages); where there is none, the
# pinned CPU wheel is installed first so that pip never pulls a multi-GB CUDA build.
.venv/.installed: requirements.txt
	python3 -m venv --system-site-packages .venv
	.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -r requirements.txt
	touch $@

test: $(SETUP)
	$(PYTHON) -m pytest -q tests

demo: $(SETUP)
	$(PYTHON) prepare_data.py --preset demo --run-dir $(RUN)

clean:
	rm -rf $(RUN)
