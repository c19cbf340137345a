"""Run configs of the training entry points: the library's component configs, composed.

    configs/clip/*.yaml  -> ClipRunConfig   (python -m train.clip --config FILE key=value ...)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from vlm.data.chat import ChatConfig
from vlm.data.shards import DataConfig
from vlm.losses import LossConfig


@dataclass
class LoraConfig:
    """LoRA on a tower through peft (attention/MLP linears)."""

    r: int = 0  # 0: off
    alpha: int = 16
    dropout: float = 0.0
    method: str = "lora"  # lora | dora | rslora | loha | lokr (peft; vlm/models/lora.py)
    target: str = r".*\.(c_fc|c_proj|out_proj|qkv|fc1|fc2|query|key|value|dense)$"  # module-name regex in the tower


@dataclass
class ClipModelConfig:
    """Which architecture (configs/model/<name>.json or a JSON path) and how its towers train."""

    name: str = "tiny-vit-text"
    pretrained: Optional[str] = None  # model.safetensors of ours or of an open_clip export folder
    attn_impl: str = "sdpa"  # sdpa | eager | xformers | flash_attention_2 (the last two: GPU extras)
    grad_checkpointing: bool = False
    lock_image: bool = False  # freeze the image tower, its projection into the joint space included
    lock_image_unlocked_groups: int = 0  # with lock_image: keep the last N of open_clip's layer groups trainable
    lock_text: bool = False  # freeze the text tower (embeddings, layers, final norm, projection)
    lock_text_unlocked_layers: int = 0  # with lock_text: keep the last N of open_clip's layer groups trainable
    lora_image: LoraConfig = field(default_factory=LoraConfig)
    lora_text: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        from vlm.models.attention import IMPLS

        if self.attn_impl not in IMPLS:
            raise ValueError(f"model.attn_impl must be one of {IMPLS}, got {self.attn_impl!r}")


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.2  # not applied to norms, biases, embeddings' positions and logit scales
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm (0: off)
    grad_accum: int = 1  # micro-batches per optimizer step (same gradient as the large batch)
    ema_decay: float = 0.0  # > 0: keep an exponential moving average of the weights

    def __post_init__(self):
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be cosine or constant, got {self.schedule!r}")
        if self.grad_accum < 1:
            raise ValueError("optim.grad_accum must be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError("optim.ema_decay must be in [0, 1)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"optim.lr must be a positive number, got {self.lr}")
        for name in ("weight_decay", "grad_clip", "min_lr_ratio", "eps"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"optim.{name} must be a finite number >= 0, got {value}")
        if not self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1] (a fraction of optim.lr), got {self.min_lr_ratio}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"optim.beta1 and optim.beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/clip"
    steps: int = 1000  # optimizer steps
    precision: str = "fp32"  # fp32 | bf16: compute dtype (autocast; FSDP2 also all-gathers in bf16)
    # dtype of the trained weights and optimizer states. fp32 (default): master weights in fp32 whatever
    # the checkpoint's stored dtype (a bf16 LLM is upcast), so small updates do not round away.
    # bf16: keep every weight and AdamW state in bf16 (half the memory; updates below bf16's
    # resolution are lost): only with precision=bf16, and only on purpose.
    master_dtype: str = "fp32"
    parallel: str = "ddp"  # ddp | fsdp (FSDP2 fully_shard) | hsdp (FSDP2 on a 2-D mesh: replicate x shard)
    # hsdp: ranks per shard group (parameters sharded within it, replicated across groups); 0 = the local
    # world size (one node: shard inside a node, replicate across nodes)
    shard_group_size: int = 0
    # torch.compile every transformer block (the towers' and the LLM's layers), before FSDP2 wraps them
    compile: bool = False
    seed: int = 0
    log_every: int = 10
    save_every: int = 200  # checkpoint every N steps (and at the end; 0: only at the end)
    keep_last: int = 3  # complete checkpoints kept (0: all)
    # periodic checkpoints written in the background (dcp.async_save): the step continues while the shards
    # (copied to host memory first) go to disk; the final and the SIGTERM checkpoints are always synchronous
    async_checkpoint: bool = False
    # at the end of the run, the last checkpoint's weights in one model.safetensors (+ ema.safetensors)
    consolidate: bool = True
    resume: Optional[str] = None  # latest | a checkpoint folder
    max_nonfinite: int = 10  # consecutive non-finite losses before the run stops
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    eval_every: int = 0  # zero-shot evaluation every N steps (0: only at the end, if sets are given)
    progress: bool = True

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be fp32 or bf16, got {self.precision!r}")
        if self.master_dtype not in ("fp32", "bf16"):
            raise ValueError(f"train.master_dtype must be fp32 or bf16, got {self.master_dtype!r}")
        if self.master_dtype == "bf16" and self.precision != "bf16":
            raise ValueError("train.master_dtype=bf16 (pure bf16 weights) needs train.precision=bf16")
        if self.parallel not in ("ddp", "fsdp", "hsdp"):
            raise ValueError(f"train.parallel must be ddp, fsdp or hsdp, got {self.parallel!r}")
        if self.shard_group_size < 0:
            raise ValueError("train.shard_group_size must be >= 0 (0: the local world size)")
        if self.steps < 1:
            raise ValueError("train.steps must be >= 1")
        for name in ("log_every", "max_nonfinite"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name, zero in (("save_every", "only at the end"), ("keep_last", "keep all"), ("eval_every", "only at the end")):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0 (0: {zero}), got {getattr(self, name)}")


@dataclass
class ZeroShotSetConfig:
    """A labelled image folder (one sub-folder per class) and its prompt file (configs/prompts/)."""

    name: str = "???"
    folder: str = "???"
    prompts: Optional[str] = None  # YAML with templates and class synonyms; default: "a photo of {c}."
    max_images: int = 0  # 0: all


@dataclass
class ClipRunConfig:
    model: ClipModelConfig = field(default_factory=ClipModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zeroshot: list[ZeroShotSetConfig] = field(default_factory=list)


# the attention and MLP projections of Llama, Qwen2, Mistral and Phi families
LLM_LORA_TARGET = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|qkv_proj|gate_up_proj|dense)$"


@dataclass
class AssistantModelConfig:
    """Vision tower + projector + LLM (configs/instruct/*.yaml, model:): the LLaVA assembly (vision + llm), or
    a stock VLM (vlm: any AutoModelForImageTextToText checkpoint, tuned as it is)."""

    # a stock VLM (hub id or folder: Qwen2-VL/2.5-VL, Gemma 3 / MedGemma, llava-hf, Idefics3, ...); when set,
    # vision/llm/tokenizer/projector/stage do not apply: the checkpoint is all of them, prompts are rendered
    # and images preprocessed by its own processor
    vlm: Optional[str] = None
    freeze: list[str] = field(default_factory=lambda: ["vision"])  # stock VLM: parts kept frozen (vision,
    #                                                                projector, llm; with lora.r > 0 the llm is)
    processor: dict = field(default_factory=dict)  # stock VLM: image processor settings (min_pixels, max_pixels)
    dtype: str = "auto"  # stock VLM: weights loaded as stored (auto), or float32 / bfloat16
    vision: Optional[str] = None  # a train.clip run/checkpoint/export folder, or a CLIP/SigLIP vision model id or folder
    llm: Optional[str] = None  # a causal LM hub id or local folder ...
    llm_config: dict = field(default_factory=dict)  # ... or a config to build one from (tiny demo/test LLMs)
    tokenizer: Optional[str] = None  # default: the LLM's own
    init_from: Optional[str] = None  # a train.instruct checkpoint to start from (stage 2 after stage 1)
    stage: int = 1  # 1: only the projector trains; 2: projector + LLM (full or LoRA)
    projector: str = "mlp2x_gelu"  # linear | mlp<N>x_gelu (LLaVA's names; stock transformers export: linear, mlp2x)
    vision_feature_layer: int = -2  # LLaVA reads the penultimate layer ...
    vision_select: str = "default"  # ... without the class token (full: with it)
    train_vision: bool = False  # stage 2: also train the vision tower ...
    vision_lr_scale: float = 0.1  # ... at this fraction of the learning rate
    attn_impl: str = "sdpa"  # sdpa | eager | flash_attention_2
    grad_checkpointing: bool = False  # recompute each LLM decoder layer in the backward pass (less memory)
    llm_quantize: str = "none"  # 4bit | 8bit: load model.llm quantized (bitsandbytes, CUDA); with lora.r > 0: QLoRA
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(target=LLM_LORA_TARGET))  # stage 2 (r > 0: on)

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"model.stage must be 1 or 2, got {self.stage}")
        if self.vlm and (self.vision or self.llm or self.llm_config):
            raise ValueError("model.vlm (a stock VLM) replaces model.vision / model.llm / model.llm_config: "
                             "set either the stock checkpoint or the LLaVA assembly's parts")
        if not self.vlm and list(self.freeze) != ["vision"]:
            raise ValueError("model.freeze applies to a stock VLM (model.vlm); the LLaVA assembly trains by "
                             "model.stage (1: projector; 2: projector + LLM) and model.train_vision")
        bad = [f for f in self.freeze if f not in ("vision", "projector", "llm")]
        if bad:
            raise ValueError(f"model.freeze: unknown part(s) {bad}; parts are vision, projector, llm")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.vision_select not in ("default", "full"):
            raise ValueError("model.vision_select must be default or full")
        from vlm.models.vlm import projector_depth

        projector_depth(self.projector)
        if self.llm_quantize not in ("none", "4bit", "8bit"):
            raise ValueError(f"model.llm_quantize must be none, 4bit or 8bit, got {self.llm_quantize!r}")
        if self.llm_quantize != "none" and self.vlm and self.lora.r <= 0:
            raise ValueError("model.llm_quantize trains adapters on a frozen quantized LLM (QLoRA): it needs "
                             "model.lora.r > 0")
        if self.llm_quantize != "none" and not self.vlm and (self.lora.r <= 0 or not self.llm or self.stage != 2):
            raise ValueError("model.llm_quantize trains adapters on a frozen quantized LLM (QLoRA): it needs "
                             "model.stage=2, model.lora.r > 0 and a pretrained model.llm")
        if self.attn_impl not in ("sdpa", "eager", "flash_attention_2"):
            raise ValueError(f"model.attn_impl must be sdpa, eager or flash_attention_2, got {self.attn_impl!r}")


@dataclass
class InstructRunConfig:
    model: AssistantModelConfig = field(default_factory=AssistantModelConfig)
    chat: ChatConfig = field(default_factory=ChatConfig)
    data: DataConfig = field(default_factory=DataConfig)
    packing: bool = True  # several conversations per row, attention kept inside each; else padded batches
    pack_length: int = 0  # tokens per packed row (0: chat.max_length); a micro-batch is data.batch_size
    #                       conversations packed into as few such rows as they fit
    group_size: int = 0  # packing=false: pad length-sorted groups of this many conversations (0: the whole batch)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def parse_run_config(prog: str, doc: str, cls: type, argv=None, example: str = "train.steps=100"):
    """--config FILE plus dotted key=value overrides -> the run config."""
    from vlm.config import config_parser, load_config

    args = config_parser(prog, doc, example).parse_args(argv)
    return load_config(cls, args.config, args.overrides)
