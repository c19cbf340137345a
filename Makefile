# The README's two commands:  make demo   and   make test
# Both create (or reuse) the virtual environment in .venv and install what they need first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
# torch from this machine's disk (DESIGN section 7); everything else from setup.py
TORCH  := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
# what demo needs installed first; tests/test_demo.py runs the demo in a copy of the repo with INSTALL= so
# that the copy never re-installs the package (an editable install pointing into a temporary folder)
INSTALL ?= $(STAMP)

DEMO   := runs/demo
DATA   := data/demo
# the demo's stage configs and corpus size (tests/test_demo.py runs DEMO_CONFIGS=configs/demo/tiny)
DEMO_CONFIGS ?= configs/demo
SYNTH_TRAIN  ?= 8000
SYNTH_TEST   ?= 400
STAGES := $(DEMO)/.stages
LOGS   := $(DEMO)/logs

.PHONY: demo test test-all setup clean-demo contracts bench drills

setup: $(STAMP)

$(STAMP): setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "[setup] installing into $(VENV) (torch, open_clip, transformers, ...)"
	@$(PY) -m pip install -q --upgrade pip
	@$(PY) -m pip install -q $(TORCH)
	@$(PY) -m pip install -q -e ".[dev,metrics]"
	@touch $@

# make test: the suite CI runs (one shipped config per family rehearsed); make test-all: every shipped
# config rehearsed too (tests marked slow). Two pytest workers, one test file each at a time (a file's
# module fixtures, such as the test-size demo, are built once).
TEST_ARGS ?= -n 2 --dist loadfile
test: $(STAMP)
	$(PY) -m pytest tests -m "not gpu and not slow" -q $(TEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest tests -m "not gpu" -q $(TEST_ARGS)

# the standing drill suite alone (tests/reliability, also part of make test), with its totals
drills: $(STAMP)
	$(PY) -m tests.reliability.report -- $(TEST_ARGS)

# ---------------------------------------------------------------------------------------------
# make demo: every stage writes a stamp when it succeeds, so a second `make demo` after an
# interruption continues where it stopped; `make demo FRESH=1` starts over. Each stage logs to
# runs/demo/logs/<stage>.log and a failure names the stage and its log.

ifeq ($(FRESH),1)
_fresh := $(shell rm -rf $(DEMO) $(DATA))
endif

DEMO_STAGES := synth shards inspect clip zeroshot export_clip tokenizer stage1 stage2 eval preference \
               eval_preference export_vlm ask summary
QUESTION_IMAGE = $$(ls $(DATA)/synth/eval/zeroshot/modality/chest_xray/*.png | head -n 1)

# $(call stage,name,command): numbered progress line, output to the stage's log, the stage's seconds
# in its stamp (summed into summary.json), and on failure the stage, its log and the log's tail.
define stage
	@mkdir -p $(STAGES) $(LOGS)
	@n=$$(echo "$(DEMO_STAGES)" | tr ' ' '\n' | grep -n -x "$(1)" | cut -d: -f1); \
	echo "[demo] ($$n/$(words $(DEMO_STAGES))) $(1) ... (log: $(LOGS)/$(1).log)"; \
	start=$$(date +%s); \
	if ( $(2) ) > $(LOGS)/$(1).log 2>&1; then \
		echo "[demo] $(1) done in $$(( $$(date +%s) - start ))s"; echo $$(( $$(date +%s) - start )) > $(STAGES)/$(1); \
	else \
		echo "[demo] stage '$(1)' FAILED; see $(LOGS)/$(1).log:"; tail -n 15 $(LOGS)/$(1).log; exit 1; \
	fi
endef

demo: $(INSTALL) $(STAGES)/summary
	@echo "[demo] finished ($$($(PY) -c "import json; print(json.load(open('$(DEMO)/summary.json'))['seconds'])")s of stages): corpus in $(DATA), runs and logs in $(DEMO)"
	@echo "[demo] summary: $(DEMO)/summary.json, report: $(DEMO)/README.md"

$(STAGES)/synth: | $(INSTALL)
	$(call stage,synth,$(PY) -m data_prep.synth --out $(DATA)/synth --num-train $(SYNTH_TRAIN) --num-test $(SYNTH_TEST) --image-size 64 --overwrite)

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
	$(call stage,clip,$(PY) -m train.clip --config $(DEMO_CONFIGS)/clip.yaml)

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
	$(call stage,stage1,$(PY) -m train.instruct --config $(DEMO_CONFIGS)/stage1.yaml)

$(STAGES)/stage2: $(STAGES)/stage1
	$(call stage,stage2,$(PY) -m train.instruct --config $(DEMO_CONFIGS)/stage2.yaml)

$(STAGES)/eval: $(STAGES)/stage2
	$(call stage,eval,\
	  $(PY) -m eval.suite --config $(DEMO_CONFIGS)/suite.yaml && \
	  $(PY) -m eval.report score --benchmark iu_xray --annotation $(DATA)/synth/eval/iu_xray/annotation.json \
	    --constant "No acute abnormality." --out $(DEMO)/suite/iu_xray_constant.json)

# DPO on the synthetic preference pairs (wrong finding / side / size, a hallucinated prior-exam sentence),
# then the same evaluation: eval.summary --preference compares the two
$(STAGES)/preference: $(STAGES)/eval
	$(call stage,preference,\
	  $(PY) -m data_prep.shards --format preference --input $(DATA)/synth/preference/pairs.jsonl \
	    --image-root $(DATA)/synth/eval/iu_xray/images --out $(DATA)/shards/preference --overwrite && \
	  $(PY) -m train.preference --config $(DEMO_CONFIGS)/preference.yaml)

$(STAGES)/eval_preference: $(STAGES)/preference
	$(call stage,eval_preference,$(PY) -m eval.suite --config $(DEMO_CONFIGS)/suite_preference.yaml)

$(STAGES)/export_vlm: $(STAGES)/eval_preference
	$(call stage,export_vlm,$(PY) -m train.export --checkpoint $(DEMO)/stage2 --to transformers --out $(DEMO)/exports/transformers)

$(STAGES)/ask: $(STAGES)/export_clip $(STAGES)/export_vlm
	$(call stage,ask,\
	  $(PY) -m eval.ask --model $(DEMO)/exports/open_clip --image $(QUESTION_IMAGE) \
	    --prompts configs/prompts/synth_modality.yaml \
	    --out $(DEMO)/ask_open_clip.json && \
	  $(PY) -m eval.ask --model $(DEMO)/exports/transformers --image $(QUESTION_IMAGE) \
	    --question "What imaging modality is this?" --out $(DEMO)/ask_transformers.json)

$(STAGES)/summary: $(STAGES)/ask
	$(call stage,summary,\
	  $(PY) -m eval.summary --out $(DEMO) --title "make demo: a medical VLM on the synthetic corpus" \
	    --zeroshot modality=$(DEMO)/zeroshot_modality.json --zeroshot finding=$(DEMO)/zeroshot_finding.json \
	    --retrieval $(DEMO)/retrieval.json --suite $(DEMO)/suite/summary.json \
	    --report-baseline $(DEMO)/suite/iu_xray_constant.json \
	    --export open_clip=$(DEMO)/exports/open_clip --export transformers=$(DEMO)/exports/transformers \
	    --ask $(DEMO)/ask_open_clip.json --ask $(DEMO)/ask_transformers.json \
	    --curves clip=$(DEMO)/clip/metrics.jsonl --curves stage1=$(DEMO)/stage1/metrics.jsonl \
	    --curves stage2=$(DEMO)/stage2/metrics.jsonl --curves preference=$(DEMO)/preference/metrics.jsonl \
	    --preference $(DEMO)/suite/summary.json $(DEMO)/suite_preference/summary.json \
	    --confusion $(DEMO)/zeroshot_finding_confusion.png \
	    --stage-times $(STAGES))

clean-demo:
	rm -rf $(DEMO) $(DATA)

contracts: $(STAMP)
	bash ../shared/checks/contracts.sh

# every benchmark, each building its peer's environment from nothing on first use (.peer-venv); the
# assistant benchmarks need make demo's tower, tokenizer and stage-2 checkpoint
bench: $(STAMP) $(STAGES)/summary
	$(PY) bench/data_pipeline.py
	$(PY) bench/clip_train.py
	$(PY) bench/clip_train.py --compile
	$(PY) bench/instruct_packing.py
	$(PY) bench/generate.py
	$(PY) bench/choice_scoring.py
	$(PY) bench/resume.py
