# One-command set-up on a fresh machine: a venv with the CPU torch wheel pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run study bases pretrain test test-slow rehearse gpu-check clean

# CPU kernels pinned to AVX2 (tsparse.machine.PINNED_KERNELS): a seeded build then gave the same bytes with the
# CPU's AVX-512 on and off, at no measured speed cost (docs/reliability.md#bytes-across-machines).
# `make run PINNED=` runs with torch's own choice of kernels.
PINNED ?= ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(PY)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"

# The pretrained micro base every augmentation run loads (built once, about 11 min on 2 CPU cores).
artifacts/micro-base/config.json: | install
	$(PINNED) $(PY) -m tsparse.train +experiment=pretrain_micro

# The main job on the embedded offline default (micro LLaMA + local WikiText-2): the differential-LR
# triple-sparse run (resumed, not overwritten, if it exists).
run: install artifacts/micro-base/config.json
	$(PINNED) $(PY) -m tsparse.train +experiment=diff_lr ckpt_path=auto

# A study of docs/results.md (STUDY=quality|experts|ablations|schedule|init|routing|proportions,
# conf/study/): its cells x 3 seeds, then its report in outputs/study/micro/reports/$(STUDY)/.
# Re-running it resumes an interrupted study.
STUDY ?= quality
study: install artifacts/micro-base/config.json
	$(PINNED) $(PY) -m tsparse.train -m +study=$(STUDY)

# The bases study (conf/study/bases.yaml): a base pretrained with each of BASE_SEEDS, then the study's cells
# on each, in outputs/study/micro-seed<N>/ (about 45 min per base on 2 cores). BASES_STUDY=bases_more runs
# the other claims' cells on the same bases (conf/study/bases_more.yaml; about 22 min more per base).
BASE_SEEDS ?= 1 2
BASES_STUDY ?= bases
artifacts/micro-base-seed%/config.json: | install
	$(PINNED) $(PY) -m tsparse.train +experiment=pretrain_micro seed=$* model.name_or_path=artifacts/micro-base-seed$*

bases: $(foreach s,$(BASE_SEEDS),artifacts/micro-base-seed$(s)/config.json)
	for s in $(BASE_SEEDS); do $(PINNED) $(PY) -m tsparse.train -m +study=$(BASES_STUDY) base_seed=$$s || exit $$?; done

pretrain: install
	$(PINNED) $(PY) -m tsparse.train +experiment=pretrain_micro

test: install
	$(PY) -m pytest -q --durations=15

test-slow: install
	$(PY) -m pytest -q -m slow

# TinyLlama's real shape on CPU, offline (random-init base): train 3 steps -> export -> reload -> generate ->
# lm-eval, with wall time and peak RSS per stage (~20 GiB of RAM, tens of minutes on 2 cores). RANKS=2: on 2
# CPU ranks with sharded tables and a bf16 base.
RANKS ?= 1
rehearse: install
	$(PY) -m tsparse.rehearse --ranks $(RANKS)

# On one CUDA GPU, under 5 minutes: eager and compiled training, generation with and without the KV cache,
# 2-GPU DDP when two are visible, bench=tinyllama. Exits 2 without CUDA.
gpu-check: install
	$(PY) -m tsparse.gpu_check

clean:
	rm -rf outputs/runs outputs/multirun .pytest_cache
