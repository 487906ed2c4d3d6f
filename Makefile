# The two commands of the README. Both create ./.venv on first use.
#   make demo   set up, then run the whole workflow on synthetic demo data (a few minutes, 2 CPUs)
#   make test   set up, then run the test suite (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := demo_run

.PHONY: demo test lint clean-demo

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,pretrained,openvino]"
	touch $@

demo: $(VENV)/.installed
	rm -rf $(DEMO)
	$(BIN)/python -m res_unet.demo --out $(DEMO)/data --count 48 --test-count 8 --size 256 --seed 0
	$(BIN)/make_tfrecords --config config/demo.json --images $(DEMO)/data/train/images \
		--labels $(DEMO)/data/train/labels --out $(DEMO)/dataset --workers 2
	$(BIN)/train_resunet --config config/demo.json --data $(DEMO)/dataset --out $(DEMO)/model
	$(BIN)/seg_images_in_folder --model $(DEMO)/model --images $(DEMO)/data/test/images \
		--labels $(DEMO)/data/test/labels --out $(DEMO)/segmentation --overlap 0.25
	@echo "demo outputs: $(DEMO)/dataset (shards + samples.png), $(DEMO)/model (weights, curves,"
	@echo "evaluation.json, model_card.json), $(DEMO)/segmentation (masks, overlays, scores.csv, examples.png)"

# make test runs the suite in TEST_WORKERS pytest-xdist processes (0: in one process); the
# fault-injection tests stay together in one (--dist loadgroup) so their runs are shared.
# pytest's exit code 5 means it collected no tests: a failure with its own line.
TEST_WORKERS ?= 2

test: $(VENV)/.installed
	@status=0; $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=15 \
		|| status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$status

lint: $(VENV)/.installed
	$(BIN)/ruff check res_unet tests bench

clean-demo:
	rm -rf $(DEMO)
