# `make demo`: set up, build the Fashion-MNIST lists, train MMHH on the CPU and evaluate the snapshot.
# `make test`: set up and run the test suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
FASHION_ROOT ?= /usr/share/datasets/fashion-mnist
DEMO_ITERS := 800
DEMO_FLAGS := --s_dataset fashion_mnist --annotation demo --image_network ResNetFc --backbone ResNet18 \
	--pretrained none --resize_size 28 --crop_size 28 --crop_scale 1.0 --hash_bit 48 --batch_size 48 \
	--num_iters $(DEMO_ITERS) --lr 0.02 --decay_step 300 --weight_decay 5e-4 --gamma 10 --loss_lambda 0.001 \
	--radius 2 --workers 0 --gpu_id cpu --print_every 50 --test_sample_ratio 0.1

.PHONY: setup test demo compare compare-common compare-tune compare-tuned claims-data claims-tune claims-table \
	claims-ablation claims-report claims-all bench clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest

demo: setup data/fashion_mnist/train.txt
	@echo "make demo replaces its own earlier demo run (annotation 'demo', test_output/demo) on purpose: --overwrite"
	$(PY) train_mmhh.py $(DEMO_FLAGS) --overwrite
	$(PY) test_mmhh.py --model_path snapshot/hash/demo_fashion_mnist_fashion_mnist_iter_$$(printf %05d $(DEMO_ITERS)) \
		--dataset fashion_mnist --radius 2 --batch_size 256 --workers 0 --gpu_id cpu \
		--annotation demo-test --output_path test_output/demo --overwrite

# The comparison table of the README: every method at its recipe, 16 and 48 bits, one seed, on the CPU.
COMPARE_FLAGS := --image_network ResNetFc --backbone ResNet18 --pretrained none --resize_size 28 --crop_size 28 \
	--crop_scale 1.0 --num_iters $(DEMO_ITERS) --workers 0 --gpu_id cpu --print_every 100

compare: setup data/fashion_mnist/train.txt
	$(PY) compare.py --dataset fashion_mnist --methods MMHH DCH HashNet --bits 16 48 --seeds 0 \
		--output compare/fashion_mnist $(COMPARE_FLAGS)

# The same cells with one optimiser for every method, each keeping its recipe's loss flags.
OPTIMISER := --lr_schedule_type Stair_Step --decay_step 300 --weight_decay 5e-4 --batch_size 48

# The demo's lr, tuned for MMHH at 48 bits on a validation split.
compare-common: setup data/fashion_mnist/train.txt
	$(PY) compare.py --dataset fashion_mnist --methods MMHH DCH HashNet --bits 16 48 --seeds 0 \
		--output compare/fashion_mnist_common $(COMPARE_FLAGS) $(OPTIMISER) --lr 0.02

# Every method's lr tuned on validation queries carved from the training images: the grid, then the table
# at the lr with the best mean MAP@H<=2 over 16 and 48 bits for each method (the README's choice: 0.005).
TUNE_LRS := 0.005 0.01 0.02
TUNED_LRS := --method_flags MMHH="--lr 0.005" --method_flags DCH="--lr 0.005" --method_flags HashNet="--lr 0.005"

compare-tune: setup data/fashion_mnist_tune/val.txt
	for lr in $(TUNE_LRS); do \
		$(PY) compare.py --dataset fashion_mnist_tune --methods MMHH DCH HashNet --bits 16 48 --seeds 0 \
			--output compare/tune/lr$$lr $(COMPARE_FLAGS) $(OPTIMISER) --eval_split val --lr $$lr || exit 1; \
	done

compare-tuned: setup data/fashion_mnist/train.txt
	$(PY) compare.py --dataset fashion_mnist --methods MMHH DCH HashNet --bits 16 48 --seeds 0 1 2 \
		--output compare/fashion_mnist_tuned $(COMPARE_FLAGS) $(OPTIMISER) $(TUNED_LRS)

# The paper's claims (README, "The paper's claims"): five protocols, four methods, each tuned on validation,
# three seeds. One thread a training, as the README's numbers were made (the thread count changes the last
# digits of every step), which also lets two stages share 2 cores. Every stage resumes where it stopped.
CLAIMS := OMP_NUM_THREADS=1 $(PY) claims.py

claims-data: setup data/fashion_mnist/train.txt
	$(CLAIMS) data

claims-tune: claims-data
	$(CLAIMS) tune

claims-table: claims-data
	$(CLAIMS) table

claims-ablation: claims-data
	$(CLAIMS) ablation

claims-report: setup
	$(CLAIMS) report

# Every stage, two at a time, each as soon as what it needs has finished; then the report. In the background:
# nohup make claims-all > claims/all.log 2>&1 &   (stop: kill the PID its first line names; rerun to resume)
claims-all: claims-data
	$(CLAIMS) all

data/fashion_mnist_tune/val.txt: data/fashion_mnist/train.txt
	$(PY) pre_process.py val --dataset fashion_mnist --size 500 --into fashion_mnist_tune

data/fashion_mnist/train.txt:
	@if [ ! -e $(FASHION_ROOT)/train-images-idx3-ubyte.gz ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& [ -z "$$MMHH_NO_APT" ]; then \
		echo "Installing Debian's dataset-fashion-mnist (set MMHH_NO_APT=1 to skip)"; \
		apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist) || true; \
	fi
	$(PY) pre_process.py fashion_mnist --root $(FASHION_ROOT)

bench: setup
	$(PY) bench/bench_metrics.py

# `make serve`: the search page and JSON API on the demo's database (after `make demo`); open
# http://127.0.0.1:8000/ in a browser. SERVE_FLAGS adds serve.py flags, e.g. SERVE_FLAGS="--port 8080".
.PHONY: serve
serve: setup
	@test -f test_output/demo/database_code.npy || { echo "make serve serves the demo's database: run make demo first"; exit 2; }
	$(PY) serve.py --codes_dir test_output/demo --dataset fashion_mnist --gpu_id cpu --workers 0 \
		--model_path snapshot/hash/demo_fashion_mnist_fashion_mnist_iter_$$(printf %05d $(DEMO_ITERS)) $(SERVE_FLAGS)

clean-venv:
	rm -rf $(VENV)
