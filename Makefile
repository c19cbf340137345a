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

demo: $(STAMP) $(STAGES)/export_clip $(STAGES)/export_vlm
	@echo "[demo] finished: corpus in $(DATA), runs and logs in $(DEMO)"

$(STAGES)/synth: | $(STAMP)
	$(call stage,synth,$(PY) -m data_prep.synth --out $(DATA)/synth --num-train 8000 --num-test 400 --image-size 64 --overwrite)

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

$(STAGES)/clip: $(STAGES)/inspect
	$(call stage,clip,$(PY) -m train.clip --config configs/clip/demo.yaml train.resume=latest train.progress=false)

$(STAGES)/zeroshot: $(STAGES)/clip
	$(call stage,zeroshot,\
	  $(PY) -m eval.zeroshot --checkpoint $(DEMO)/clip --folder $(DATA)/synth/eval/zeroshot/modality \
	    --prompts configs/prompts/synth_modality.yaml --out $(DEMO)/zeroshot_modality.json && \
	  $(PY) -m eval.zeroshot --checkpoint $(DEMO)/clip --folder $(DATA)/synth/eval/zeroshot/finding \
	    --prompts configs/prompts/synth_finding.yaml --out $(DEMO)/zeroshot_finding.json && \
	  $(PY) -m eval.retrieval --checkpoint $(DEMO)/clip --pairs $(DATA)/synth/eval/retrieval.jsonl \
	    --out $(DEMO)/retrieval.json)

$(STAGES)/export_clip: $(STAGES)/zeroshot
	$(call stage,export_clip,$(PY) -m train.export --checkpoint $(DEMO)/clip --to open_clip --out $(DEMO)/exports/open_clip)

$(STAGES)/tokenizer: $(STAGES)/synth
	$(call stage,tokenizer,$(PY) -m data_prep.tokenizer --shards $(DATA)/synth/instruct $(DATA)/synth/pretrain --out $(DATA)/tokenizer)

$(STAGES)/stage1: $(STAGES)/clip $(STAGES)/tokenizer
	$(call stage,stage1,$(PY) -m train.instruct --config configs/instruct/demo_stage1.yaml train.resume=latest train.progress=false)

$(STAGES)/stage2: $(STAGES)/stage1
	$(call stage,stage2,$(PY) -m train.instruct --config configs/instruct/demo_stage2.yaml train.resume=latest train.progress=false)

$(STAGES)/vqa: $(STAGES)/stage2
	$(call stage,vqa,\
	  $(PY) -m eval.vqa generate --checkpoint $(DEMO)/stage2 --benchmark slake --data-root $(DATA)/synth/eval/slake \
	    --out $(DEMO)/vqa_predictions.jsonl --batch-size 32 && \
	  $(PY) -m eval.vqa score --benchmark slake --data-root $(DATA)/synth/eval/slake \
	    --predictions $(DEMO)/vqa_predictions.jsonl --out $(DEMO)/vqa.json)

$(STAGES)/report: $(STAGES)/stage2
	$(call stage,report,\
	  $(PY) -m eval.report generate --checkpoint $(DEMO)/stage2 --benchmark iu_xray \
	    --annotation $(DATA)/synth/eval/iu_xray/annotation.json --out $(DEMO)/report_predictions.jsonl && \
	  $(PY) -m eval.report score --benchmark iu_xray --annotation $(DATA)/synth/eval/iu_xray/annotation.json \
	    --predictions $(DEMO)/report_predictions.jsonl --out $(DEMO)/report.json)

$(STAGES)/export_vlm: $(STAGES)/vqa $(STAGES)/report
	$(call stage,export_vlm,$(PY) -m train.export --checkpoint $(DEMO)/stage2 --to transformers --out $(DEMO)/exports/transformers)

clean-demo:
	rm -rf $(DEMO) $(DATA)

contracts: $(STAMP)
	bash ../shared/checks/contracts.sh

bench: $(STAMP)
	$(PY) bench/data_pipeline.py
