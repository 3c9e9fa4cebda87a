# The two entry points of the README: `make demo` and `make test` (each installs first).
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q -e '.[dev]'

.PHONY: install demo test lint

install:
	$(PIP_INSTALL)

# Teacher, then a KDP student and a plain (`none`) student on the built-in offline data, then compare them.
demo: install
	cdl fit --config configs/demo.yaml
	cdl fit --config configs/demo/student_kdp.yaml
	cdl fit --config configs/demo/student_none.yaml
	cdl compare runs/demo/teacher runs/demo/student_kdp runs/demo/student_none --names teacher "KDP student" "plain student"

test: install
	$(PYTHON) -m pytest

lint:
	ruff check cdl_lightning tests benchmarks
