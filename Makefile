# Two commands do everything: `make demo` (the whole pipeline on the embedded default, then base vs
# DrPose) and `make test`. Both set up a local virtual environment on first use. Bring your own
# environment with `make demo PYTHON=python` (it must already have requirements.txt installed).
# Each stage is a file target, so a second `make demo` only redoes stages whose output is missing
# (`make clean` starts over).
PYTHON ?= .venv/bin/python
RUN ?= runs/demo
PRESET ?= demo
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

$(RUN)/data/bench/manifest.json: | $(SETUP)
	$(PYTHON) prepare_data.py --preset $(PRESET) --run-dir $(RUN)

$(RUN)/posescore/posescore_config.json: $(RUN)/data/bench/manifest.json
	$(PYTHON) posescore.py train --preset $(PRESET) --run-dir $(RUN)

# The demo's base model: two CPU cores cannot train a usable one in minutes, so by default the
# stage starts from pretrained/demo_base (our own demo-architecture model, trained on one GPU by
# bench/results/gpu_demo_base.sh; see pretrained/demo_base/README.md) and only evaluates it
# (--steps 0). `make demo FROM_SCRATCH=1` trains it here instead.
BASE_INIT := $(if $(FROM_SCRATCH),,--init pretrained/demo_base --steps 0)
$(RUN)/base/model_config.json: $(RUN)/data/bench/manifest.json
	$(PYTHON) pretrain.py --preset $(PRESET) --run-dir $(RUN) $(if $(filter demo,$(PRESET)),$(BASE_INIT),)

$(RUN)/drpose/model_config.json: $(RUN)/base/model_config.json $(RUN)/posescore/posescore_config.json
	$(PYTHON) finetune.py --preset $(PRESET) --run-dir $(RUN)

# The supervised ceiling, the yardstick DrPose is judged by (not a method): the base fine-tuned with its
# own diffusion loss on six-view renders of the DrPose poses (data/drpose_gt/, the 3D data DrPose does
# without), with DrPose's sample budget (steps x batch of finetune.py's preset). Half of each batch replays the
# scans and the saved weights are an EMA: the recipe of the measured learning curve (docs/results.md), which
# beats plain fine-tuning at every budget on held-out scans. At the demo's 400 samples no ceiling beats the base.
CEILING_BUDGET := $(if $(filter demo,$(PRESET)),--steps 100 --batch-size 4,--steps 1500 --batch-size 16)
$(RUN)/ceiling/model_config.json: $(RUN)/base/model_config.json
	$(PYTHON) pretrain.py --preset $(PRESET) --run-dir $(RUN) --init $(RUN)/base --out $(RUN)/ceiling \
		--train-data $(RUN)/data/drpose_gt/train.npz $(CEILING_BUDGET) --lr 5e-4 --warmup-steps 10 --num-eval 0 \
		--replay-data $(RUN)/data/scans/train.npz --replay-share 0.5 --ema-decay 0.995

# The pose reader that reconstruction and evaluation read poses with (a g_skel trained apart from the
# reward, on broad poses in any orientation). By default the demo takes the one our code trained on
# one GPU (pretrained/demo_reader, see its README) and only validates it; FROM_SCRATCH=1 trains it here.
READER_INIT := $(if $(FROM_SCRATCH),,--init pretrained/demo_reader --steps 0)
$(RUN)/pose_reader/posescore_config.json: $(RUN)/data/bench/manifest.json
	$(PYTHON) posescore.py train --preset $(PRESET) --run-dir $(RUN) --out $(RUN)/pose_reader --train-on any --seed 1 $(if $(filter demo,$(PRESET)),$(READER_INIT),)

$(RUN)/recon/%/manifest.json: $(RUN)/%/model_config.json $(RUN)/pose_reader/posescore_config.json
	$(PYTHON) reconstruct.py --preset $(PRESET) --run-dir $(RUN) --model $*

demo: $(RUN)/recon/base/manifest.json $(RUN)/recon/drpose/manifest.json $(RUN)/recon/ceiling/manifest.json
	$(PYTHON) evaluate.py --preset $(PRESET) --run-dir $(RUN) --models base drpose ceiling

clean:
	rm -rf $(RUN)
