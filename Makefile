# The README's two commands:  make demo   and   make test
# Both create (or reuse) the virtual environment in .venv and install what they need first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# torch from this machine's disk (DESIGN section 7); everything else from setup.py
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

DEMO   := runs/demo
DATA   := data/demo
STAGES := $(DEMO)/.stages
LOGS   := $(DEMO)/logs

.PHONY: demo test setup clean-demo contracts bench

setup: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup] installing into $(VENV) (torch, open_clip, transformers, ...)"
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q $(TORCH)
	@$(PY) -m pip install -q -e ".[dev,metrics]"
	@touch $@

test: $(STAMP)
	$(PY) -m pytest tests -m "not gpu" -q

# ---------------------------------------------------------------------------------------------
# make demo: every stage writes a stamp when it succeeds, so a second `make demo` after an
# interruption continues where it stopped; `make demo FRESH=1` starts over. Each stage logs to
# runs/demo/logs/<stage>.log and a failure names the stage and its log.

ifeq ($(FRESH),1)
_fresh := $(shell rm -rf $(DEMO) $(DATA))
endif

# $(call stage,name,command)
define stage
	@mkdir -p $(STAGES) $(LOGS)
	@echo "[demo] $(1) ..."
	@start=$$(date +%s); \
	if ( $(2) ) > $(LOGS)/$(1).log 2>&1; then \
		echo "[demo] $(1) done in $$(( $$(date +%s) - start ))s"; touch $(STAGES)/$(1); \
	else \
		echo "[demo] stage '$(1)' FAILED; see $(LOGS)/$(1).log:"; tail -n 15 $(LOGS)/$(1).log; exit 1; \
	fi
endef

demo: $(STAMP) $(STAGES)/inspect
	@echo "[demo] finished: corpus in $(DATA), logs in $(LOGS)"

$(STAGES)/synth: | $(STAMP)
	$(call stage,synth,$(PY) -m data_prep.synth --out $(DATA)/synth --num-train 2000 --num-test 400 --image-size 64 --overwrite)

$(STAGES)/shards: $(STAGES)/synth
	$(call stage,shards,\
	  $(PY) -m data_prep.shards --format r2gen --input $(DATA)/synth/eval/iu_xray/annotation.json --split train \
	    --out $(DATA)/shards/iu_xray_train --overwrite --concepts configs/concepts/medical.yaml && \
	  $(PY) -m data_prep.shards --format slake --input $(DATA)/synth/eval/slake/test.json \
	    --out $(DATA)/shards/slake_test --overwrite && \
	  $(PY) -m data_prep.shards --format imagefolder --input $(DATA)/synth/eval/zeroshot/finding \
	    --caption-template "an image showing {label}" --out $(DATA)/shards/zeroshot_finding --overwrite)

$(STAGES)/inspect: $(STAGES)/shards
	$(call stage,inspect,\
	  for d in $(DATA)/synth/pretrain $(DATA)/synth/instruct $(DATA)/shards/*; do $(PY) -m data_prep.inspect $$d || exit 1; done && \
	  $(PY) -m data_prep.stream --config configs/data/demo.yaml sources.0.path=$(DATA)/synth/pretrain)

clean-demo:
	rm -rf $(DEMO) $(DATA)

contracts: $(STAMP)
	bash ../shared/checks/contracts.sh

bench: $(STAMP)
	$(PY) bench/data_pipeline.py
