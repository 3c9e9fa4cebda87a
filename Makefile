# The entry points of the README: `make demo`, `make test` (the fast suite) and `make test-all` (everything CI runs);
# each installs first. `make test-gpu` runs the CUDA suite (tests/gpu) on a GPU machine, without installing.
PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install -q -e '.[dev]'

.PHONY: install demo test test-all test-gpu lint

install:
	$(PIP_INSTALL)

TEACHER_VIT = '{"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}'
STUDENT_VIT = '{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3}'

# Offline: pretrain two tiny ViTs on synthetic classes 20-39, then on classes 0-19 train a teacher, a KDP student and
# a plain (`none`) student, and compare them.
demo: install
	cdl pretrain --out runs/demo/backbones/teacher.pth --classes 20 40 --epochs 4 --model-kwargs $(TEACHER_VIT)
	cdl pretrain --out runs/demo/backbones/student.pth --classes 20 40 --epochs 4 --model-kwargs $(STUDENT_VIT)
	cdl fit --config configs/demo.yaml
	cdl fit --config configs/demo/student_kdp.yaml
	cdl fit --config configs/demo/student_none.yaml
	cdl compare runs/demo/teacher runs/demo/student_kdp runs/demo/student_none --names teacher "KDP student" "plain student"

# the fast suite (a few minutes on 2 CPU cores): everything except the tests marked slow (notebooks, torch.compile,
# subprocess runs) and the GPU suite
test: install
	$(PYTHON) -m pytest -m "not slow and not gpu"

# everything that runs on a CPU machine (CI): the fast suite and the slow tests
test-all: install
	$(PYTHON) -m pytest -m "not gpu"

# the CUDA suite (bitwise fast paths vs eager, graph counters, exact resume; 2-GPU DDP evaluation when 2 GPUs exist)
test-gpu:
	$(PYTHON) -m pytest -m gpu tests/gpu

lint:
	ruff check cdl_lightning tests benchmarks
