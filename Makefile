# The README's two commands: `make demo` and `make test`. Both install first (idempotent);
# `make test` runs `make lint` (ruff, configured in pyproject.toml) before the tests.
# `make test-fast` is the one to run while editing: every test not marked slow (pytest.ini).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
TORCH_PIN := torch==2.14.1 torchvision==0.29.1

.PHONY: install lint demo test test-fast bench clean-demo gpu-wheels device-image-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[all,test,lint]' $(TORCH_PIN)
	touch $@

# The whole chain on CPU, small: simulate (2 MPI ranks) -> pretrain (2 torchrun processes) ->
# embed -> UMAP -> probe -> export -> fine-tune vs random init. Rerunning resumes/skips each step.
DEMO ?= demo_out
TORCHRUN := $(BIN)/torchrun --standalone --nproc_per_node 2
HL := $(BIN)/hpc-lensiam
demo: install
	$(BIN)/mpiexec -n 2 $(HL) simulate --out shards/demo --pairs 512 --shard-size 32 --seed 0
	$(BIN)/mpiexec -n 2 $(HL) simulate --out shards/demo_euclid_train --samples single --preset euclid --pairs 320 --shard-size 32 --seed 1
	$(BIN)/mpiexec -n 2 $(HL) simulate --out shards/demo_euclid_test --samples single --preset euclid --pairs 256 --shard-size 32 --seed 2
	$(HL) show shards/demo --out $(DEMO)/pairs.png -n 8
	$(TORCHRUN) -m hpc_lensiam train --config configs/demo.yaml --data shards/demo --out $(DEMO)/run \
	    $$(test -f $(DEMO)/run/checkpoints/last.pt && echo --resume)
	$(TORCHRUN) -m hpc_lensiam embed --checkpoint $(DEMO)/run/checkpoints/last.pt --data shards/demo --out $(DEMO)/emb.h5
	$(HL) umap --embeddings $(DEMO)/emb.h5 --out $(DEMO)/umap.png
	$(HL) probe --embeddings $(DEMO)/emb.h5 --json $(DEMO)/probe.json
	$(HL) export --checkpoint $(DEMO)/run/checkpoints/last.pt --out $(DEMO)/backbone.pt
	$(HL) finetune --backbone $(DEMO)/backbone.pt --arch resnet18 --train shards/demo_euclid_train \
	    --test shards/demo_euclid_test --n-train 256 --n-test 256 --epochs 8 --json $(DEMO)/finetune_lensiam.json
	$(HL) finetune --backbone none --arch resnet18 --train shards/demo_euclid_train \
	    --test shards/demo_euclid_test --n-train 256 --n-test 256 --epochs 8 --json $(DEMO)/finetune_none.json
	@echo "demo: shards in shards/demo, shards/demo_euclid_{train,test}; pairs grid $(DEMO)/pairs.png;" \
	    "run $(DEMO)/run (metrics.csv, checkpoints/); embeddings $(DEMO)/emb.h5; UMAP $(DEMO)/umap.png;" \
	    "probe $(DEMO)/probe.json; backbone $(DEMO)/backbone.pt; fine-tuning $(DEMO)/finetune_{lensiam,none}.json"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(PY) -m pytest -q tests -m "not device_image"

# No multi-process (mpiexec, torchrun, gloo ranks), Slurm or long end-to-end test: those are marked
# slow and run in `make test` (and CI) only. Two pytest-xdist workers (this machine's 2 cores).
test-fast: install
	$(PY) -m pytest -q -n 2 -m "not slow and not device_image" tests

# Every bench script's quick mode (bench/registry.py, one line per script), then one table of ratios.
bench: install
	$(PY) -m bench.registry

# The GPU machine (bare image, no package index): the wheels its check needs beyond the image
# (DeepSpeed, webdataset; ~6 MB in the ignored .whl/), and the proof on this machine that
# `bench/gpu_check.py --cpu-smoke` runs in a Python 3.12 venv of only the image's packages
# (bench/device_image.txt) plus those wheels, with the network off (tests/ops/test_device_image.py).
gpu-wheels: install
	bash ci/gpu-wheels.sh

device-image-check: gpu-wheels
	bash ci/device-image-env.sh .device-image
	$(PY) -m pytest -q -m device_image tests/ops/test_device_image.py
