# One-command set-up on a fresh machine: a venv with the CPU torch wheel pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run pretrain test test-slow clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"

# The main job on the embedded offline default (micro LLaMA + local WikiText-2): pretrain the micro base
# if it is missing, then the differential-LR triple-sparse run (resumed, not overwritten, if it exists).
run: install
	@test -f artifacts/micro-base/config.json || $(PY) -m tsparse.train +experiment=pretrain_micro
	$(PY) -m tsparse.train +experiment=diff_lr $$(test -f outputs/runs/diff_lr/checkpoints/last.ckpt && echo ckpt_path=last)

pretrain: install
	$(PY) -m tsparse.train +experiment=pretrain_micro

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

clean:
	rm -rf outputs/runs outputs/multirun .pytest_cache
