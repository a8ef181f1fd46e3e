# Two commands on a fresh Debian machine:
#   make demo   - install everything, start a local Ray head, submit the pipeline on Fashion-MNIST
#   make test   - install everything (the torch_xla environment too), run the tests on a real local Ray
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= $(CURDIR)/runs/demo
CONFIG ?= configs/demo.yaml
# In-process clusters (make test, bench) run without auth; the local head of ray-up/demo/sweep-demo requires
# Ray's token (~/.ray/auth_token, written by scripts/ray_head.sh), and every process talking to it uses token mode.
export RAY_AUTH_MODE ?= disabled
ray-up ray-down demo digit-demo sweep-demo sweep-rq-depth sweep-digit-k paper-tables: export RAY_AUTH_MODE = token
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

TPU_VENV ?= .venv-tpu
XLA_WHEELS ?= .xla-wheels

.PHONY: setup demo digit-demo sweep-demo sweep-rq-depth sweep-digit-k paper-tables paper-tables-input test bench bench-peers ray-up ray-down clean tpu-env \
	xla-check

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

ray-up: setup
	bash scripts/ray_head.sh start

ray-down:
	bash scripts/ray_head.sh stop

demo: setup ray-up
	bash scripts/submit.sh python jobs/full_pipeline.py --config $(CONFIG) --run-dir $(RUN_DIR)

# DiGIT on the demo data: SSL encoder, K-means tokens, the Transformer on them, the render stage, the evaluation.
DIGIT_RUN_DIR ?= $(CURDIR)/runs/digit
digit-demo: setup ray-up
	bash scripts/submit.sh python jobs/full_pipeline.py --config configs/digit.yaml --run-dir $(DIGIT_RUN_DIR)

# A quick sweep: three lookup dims of the demo tokenizer, 100 steps each without the discriminator, on 5,000
# train images (a few minutes). tests/test_sweep_demo.py runs exactly this recipe (`make -n sweep-demo SWEEP_DIR=...`).
SWEEP_DIR ?= $(CURDIR)/runs/sweep-demo
sweep-demo: setup ray-up
	bash scripts/submit.sh python jobs/sweep.py --config $(CONFIG) --sweep-dir $(SWEEP_DIR) \
		--grid tokenizer.codebook_dim=4,16,64 --last-stage tokenizer --metric tokenizer.val_usage_per_256 \
		--set ingest.max_images_per_split=5000 --set tokenizer.steps=100 --set tokenizer.adversarial_weight=0 \
		--set tokenizer.warmup_steps=10 --set tokenizer.val_images=1024 \
		--set tokenizer.checkpoint_every=50 --set tokenizer.image_every=50

# DiGIT's vocabulary: K = 64, 256, 1024 centroids on one shared SSL encoder (and ingest, pixel tokenizer), each trial
# K-means, pretokenize, the Transformer, the render stage and the evaluation, at a shorter budget than digit-demo's.
DIGIT_SWEEP_DIR ?= $(CURDIR)/runs/sweep-digit-k
sweep-digit-k: setup ray-up
	bash scripts/submit.sh python jobs/sweep.py --config configs/digit.yaml --sweep-dir $(DIGIT_SWEEP_DIR) \
		--grid kmeans.clusters=64,256,1024 --last-stage evaluate --metric evaluate.probe_top1_best --mode max \
		--column kmeans.val_cluster_purity --column kmeans.val_usage --column kmeans.final_inertia_per_row \
		--column evaluate.probe_top1_pixels --column evaluate.fid_domain --column evaluate.fid_domain_floor \
		--column transformer.val_loss_nats --column render.val_loss_nats \
		--set ingest.max_images_per_split=5000 --set tokenizer.steps=300 --set tokenizer.checkpoint_every=150 \
		--set tokenizer.image_every=300 --set tokenizer.val_images=1000 --set kmeans.image_fraction=0.2 \
		--set transformer.steps=150 --set transformer.decay_start=75 --set transformer.checkpoint_every=75 \
		--set transformer.eval_every=75 --set render.steps=150 --set render.decay_start=75 \
		--set render.checkpoint_every=75 --set render.eval_every=75 --set evaluate.recon_images=1000 \
		--set evaluate.inception_fid=false --set evaluate.inception_images=null \
		--set kmeans.cpus_per_actor=1.4 --set pretokenize.cpus_per_actor=1.4 --set evaluate.cpus_per_actor=1.4

# Residual quantization's depth: the whole pipeline with D = 1, 2, 4, 8 codes per position (tokenizer, pretokenize,
# RQ-Transformer, evaluate), on the demo data at a shorter budget than the demo's; one trial at a time on 2 cores.
RQ_SWEEP_DIR ?= $(CURDIR)/runs/sweep-rq-depth
sweep-rq-depth: setup ray-up
	bash scripts/submit.sh python jobs/sweep.py --config $(CONFIG) --sweep-dir $(RQ_SWEEP_DIR) \
		--grid tokenizer.rq_depth=1,2,4,8 --set tokenizer.quantizer=rq --set transformer.kind=rq \
		--last-stage evaluate --metric evaluate.fid_domain --mode min \
		--column evaluate.recon_psnr --column evaluate.rfid_domain --column tokenizer.val_perplexity \
		--column transformer.val_loss_nats --column transformer.train_tokens_per_second_overall \
		--set ingest.max_images_per_split=5000 --set tokenizer.steps=300 --set tokenizer.checkpoint_every=150 \
		--set tokenizer.image_every=300 --set tokenizer.val_images=1000 --set transformer.steps=150 \
		--set transformer.decay_start=75 --set transformer.checkpoint_every=75 --set transformer.eval_every=75 \
		--set evaluate.recon_images=1000 --set evaluate.probe_train_images=0 --set evaluate.inception_fid=false \
		--set evaluate.inception_images=null \
		--set pretokenize.cpus_per_actor=1.4 --set evaluate.cpus_per_actor=1.4  # a trial's process needs a sliver

# The paper's Table 4 (lookup dims x l2 normalisation) and Table 1 (ViT vs CNN at equal training time) on CIFAR-10,
# as Ray Tune sweeps sent to the local head like sweep-demo (the job outlives the terminal; submitting it again
# resumes it). QUICK=1: the quick size. PAPER_ARGS: more options of jobs/paper_tables.py (e.g. --images DIR).
# The archive is checked before the head starts; the job gets its absolute path (it runs from a copy of the tree).
CIFAR_ARCHIVE ?= $(abspath $(CURDIR)/../shared/data/cifar10-jpeg.tar.gz)
PAPER_DIR ?= $(CURDIR)/runs/paper-tables$(if $(QUICK),-quick)
paper-tables: paper-tables-input setup ray-up
	bash scripts/submit.sh python jobs/paper_tables.py --out $(PAPER_DIR) $(if $(QUICK),--quick) \
		$(if $(findstring --images,$(PAPER_ARGS)),,--archive $(CIFAR_ARCHIVE)) $(PAPER_ARGS)

paper-tables-input:
	@case "$(PAPER_ARGS)" in *--images*) ;; *) test -f "$(CIFAR_ARCHIVE)" || { echo "error: CIFAR-10 archive not \
	found: $(CIFAR_ARCHIVE); set CIFAR_ARCHIVE=PATH or PAPER_ARGS='--images DIR'" >&2; exit 2; } ;; esac

# tests/test_xla.py runs the TPU code path on XLA CPU devices in $(TPU_VENV), built here when missing.
test: setup tpu-env
	$(PY) -m pytest -q tests

bench: setup
	$(PY) benchmarks/ingest.py --out bench-out/ingest.json
	$(PY) benchmarks/tokenizer.py --out bench-out/tokenizer.json
	$(PY) benchmarks/pretokenize.py --out bench-out/pretokenize.json
	$(PY) benchmarks/transformer.py --out bench-out/transformer.json

# Side-by-side CPU speed against LlamaGen and enhancing-transformers, imported from ../shared/peer-bench
# (skipped with a message where that folder is absent).
bench-peers: setup
	$(PY) benchmarks/peers.py --size default --profile --out benchmarks/results/peers-cpu.json

# torch_xla 2.9.0 pins torch 2.9.0, so it lives in its own environment: the wheels of
# scripts/xla_cpu_wheels.txt (about 3.6 GB), downloaded once into $(XLA_WHEELS) inside the clone and installed
# from there. It runs torch_xla's CPU device; TPU hosts install the `tpu` extra (cluster.yaml).
tpu-env: $(TPU_VENV)/.installed

$(TPU_VENV)/.installed: scripts/xla_env.sh scripts/xla_cpu_wheels.txt
	bash scripts/xla_env.sh $(TPU_VENV) $(XLA_WHEELS)
	touch $@

# The Transformer's training under SPMD on 4 XLA CPU devices, fully sharded, with KV-cache decoding.
xla-check: tpu-env
	PJRT_DEVICE=CPU $(TPU_VENV)/bin/python scripts/xla_cpu_loop.py --devices 4 --parallelism fsdp --decode-check

clean:
	rm -rf runs bench-out
