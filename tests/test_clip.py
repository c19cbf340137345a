"""CLIP models and losses on tiny configs: gradients everywhere, reference losses, exact
accumulation, 2-process DDP = 1 process with the doubled batch."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import REPO, one_and_two_processes
from vlm.losses import LossConfig, concept_align_loss, contrastive_loss
from vlm.models.clip import MedCLIP, build_tokenizer


@pytest.mark.parametrize("name", ["tiny-vit-text", "tiny-timm-text"])
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = MedCLIP(name)
    tok = build_tokenizer(name)
    s = model.image_size
    out = model(torch.randn(4, 3, s, s), tok(["chest x-ray", "head ct", "a mass", "no effusion"]), patches=True)
    loss = contrastive_loss(LossConfig())(out["image_features"], out["text_features"], out["logit_scale"])
    pos = torch.eye(2, 4)
    cemb = model.encode_text(tok(["mass", "nodule"]))
    loss = loss + concept_align_loss(out["image_patches"], cemb, pos, model.concept_logit_scale,
                                     model.concept_logit_bias)
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    # the only unused parameter of a CLIP model: SigLIP's logit_bias does not exist here
    assert no_grad == [], no_grad
    assert out["image_patches"].shape[0] == 4 and out["image_patches"].shape[-1] == out["image_features"].shape[-1]


def test_patch_path_pools_like_encode_image():
    torch.manual_seed(0)
    model = MedCLIP("tiny-vit-text").eval()
    x = torch.randn(2, 3, 64, 64)
    pooled, patches = model.encode_image_with_patches(x)
    assert torch.allclose(pooled, model.encode_image(x), atol=1e-6)
    assert patches.shape == (2, 64, 64)


def test_clip_loss_matches_brute_force():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(6, 16), dim=-1), F.normalize(torch.randn(6, 16), dim=-1)
    scale = torch.tensor(7.0)
    loss = contrastive_loss(LossConfig(kind="clip"))(img, txt, scale)
    ref = 0.0
    for i in range(6):  # -log softmax of the matching pair, both directions, averaged
        ref += -torch.log(torch.exp(scale * img[i] @ txt[i]) / torch.exp(scale * img[i] @ txt.T).sum())
        ref += -torch.log(torch.exp(scale * txt[i] @ img[i]) / torch.exp(scale * txt[i] @ img.T).sum())
    assert torch.allclose(loss, ref / 12, atol=1e-5)


def test_siglip_loss_matches_brute_force():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(5, 16), dim=-1), F.normalize(torch.randn(5, 16), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    loss = contrastive_loss(LossConfig(kind="siglip"))(img, txt, scale, bias)
    ref = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            ref += -F.logsigmoid(z * (scale * img[i] @ txt[j] + bias))
    assert torch.allclose(loss, ref / 5, atol=1e-5)  # open_clip normalises by the batch size


def test_concept_loss_matches_brute_force():
    torch.manual_seed(0)
    patches = F.normalize(torch.randn(3, 4, 8), dim=-1)
    concepts = F.normalize(torch.randn(2, 8), dim=-1)
    pos = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    s, b = torch.tensor(1.5), torch.tensor(-2.0)
    loss = concept_align_loss(patches, concepts, pos, s, b)
    ref = 0.0
    for c in range(2):
        for j in range(3):
            best = max(float(concepts[c] @ patches[j, n]) for n in range(4))
            logit = torch.exp(s) * best + b
            ref += F.binary_cross_entropy_with_logits(logit, pos[c, j])
    assert torch.allclose(loss, ref / 6, atol=1e-5)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_equals_large_batch(synth_dir):
    """ClipTask with 2 micro-batches of 4 == 1 batch of 8 (contrastive + concept), gradient for gradient."""
    from train.clip import ClipTask
    from train.config import ClipRunConfig
    from train.distributed import Dist
    from train.trainer import StepContext
    from vlm.data.shards import DataConfig, ShardLoader, SourceConfig
    from vlm.data.transforms import ImageConfig

    cfg = ClipRunConfig()
    cfg.loss.concept_weight = 0.5
    tok = build_tokenizer("tiny-vit-text")
    loader = ShardLoader(DataConfig(sources=[SourceConfig(str(synth_dir / "pretrain"))], batch_size=8,
                                    num_workers=0, image=ImageConfig(size=64)), tokenize=tok)
    big = next(iter(loader))
    assert any(m.get("concepts") for m in big["meta"])
    halves = [{k: (v[:4] if k != "meta" else v[:4]) for k, v in big.items() if k in ("images", "tokens", "meta", "keys")},
              {k: (v[4:] if k != "meta" else v[4:]) for k, v in big.items() if k in ("images", "tokens", "meta", "keys")}]
    results = []
    for batches in ([big], halves):
        torch.manual_seed(0)
        model = MedCLIP("tiny-vit-text")
        task = ClipTask(cfg, tok)
        metrics = task.train_step(model, batches, StepContext(model, Dist(), "fp32"))
        results.append((metrics, _grads(model)))
    (m1, g1), (m2, g2) = results
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
    assert set(g1) == set(g2)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_two_process_ddp_equals_one_process(tmp_path, kind):
    one, two = one_and_two_processes(REPO / "tests" / "dist" / "clip_grads.py", tmp_path, kind)
    assert torch.allclose(one["loss"], two["loss"], atol=1e-5), (one["loss"], two["loss"])
    assert set(one) == set(two)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-4), k


def test_concept_step_two_processes_equal_one(tmp_path):
    """ClipTask's contrastive + concept step under DDP and FSDP2, with 1 and 2 micro-batches per rank, equals
    one process with the whole batch: a concept seen on both ranks counts once ('shared'), a rank without
    concepts ('empty') and a step without any ('none') neither hang nor differ, accumulation keeps every
    trainable parameter in DDP's synchronised backward, and FSDP2 averages its replicated scalars (logit
    scale, concept scale and bias) pairwise in the same order on every rank."""
    one, two = one_and_two_processes(REPO / "tests" / "dist" / "concept_step.py", tmp_path)
    assert set(one) == set(two)
    for scenario in ("shared", "empty", "none"):
        ref = {k.split(".", 2)[2]: v for k, v in one.items() if k.startswith(f"{scenario}.ddp1.")}
        concept_loss, scale_grad = float(ref["loss"][1]), float(ref["grad.concept_logit_scale"])
        assert (concept_loss == 0.0 and scale_grad == 0.0) if scenario == "none" else (concept_loss > 0 and scale_grad)
        for case in ("ddp1", "ddp2", "fsdp1", "fsdp2"):
            for results, who in ((one, "one process"), (two, "two processes")):
                got = {k.split(".", 2)[2]: v for k, v in results.items() if k.startswith(f"{scenario}.{case}.")}
                assert set(got) == set(ref), (scenario, case, who)
                for k in ref:
                    assert torch.allclose(got[k], ref[k], atol=1e-5, rtol=1e-4), \
                        (scenario, case, who, k, (got[k] - ref[k]).abs().max())


def test_hf_text_tower_from_local_folder(tmp_path):
    """A Hugging Face text tower from a local folder: a 2-layer BERT and a tokenizer trained here."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tk = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.train_from_iterator(["chest x-ray with a nodule", "head ct no abnormality", "mass in the left lung"] * 20,
                           trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    tk.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=48)
    folder = tmp_path / "tiny-bert"
    fast.save_pretrained(folder)
    BertModel(BertConfig(vocab_size=fast.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=64)).save_pretrained(folder)
    arch = json.loads((REPO / "configs/model/tiny-vit-hftext.json").read_text())
    arch["text_cfg"]["hf_model_name"] = arch["text_cfg"]["hf_tokenizer_name"] = str(folder)
    arch.pop("_comment")
    model = MedCLIP(arch)
    tok = build_tokenizer(arch)
    t = tok(["chest x-ray with a nodule", "head ct"])
    feats = model.encode_text(t)
    assert feats.shape == (2, 64) and torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)
    pooled, per_token = model.encode_text_with_tokens(t)
    assert torch.allclose(pooled, feats, atol=1e-6) and per_token.shape[0] == 2 and per_token.shape[-1] == 64
    arch["text_cfg"]["hf_model_name"] = str(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="not a local folder"):
        MedCLIP(arch)


def test_attention_implementations_agree_and_keep_the_state_dict():
    from vlm.models.attention import set_attention

    torch.manual_seed(0)
    model = MedCLIP("tiny-vit-text").eval()
    tok = build_tokenizer("tiny-vit-text")
    x, t = torch.randn(2, 3, 64, 64), tok(["a chest x-ray", "head ct scan"])
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model.encode_image(x), model.encode_text(t)  # stock nn.MultiheadAttention
        for impl in ("eager", "sdpa"):
            assert set_attention(model, impl) == 4
            out = model.encode_image(x), model.encode_text(t)
            assert torch.allclose(out[0], ref[0], atol=1e-6) and torch.allclose(out[1], ref[1], atol=1e-6), impl
    assert list(model.state_dict()) == keys


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["xformers", "flash_attention_2"])
def test_gpu_attention_kernels_match_sdpa(impl):
    pytest.importorskip("xformers" if impl == "xformers" else "flash_attn")
    from vlm.models.attention import set_attention

    torch.manual_seed(0)
    model = MedCLIP("tiny-vit-text").cuda().eval().to(torch.bfloat16)
    x = torch.randn(4, 3, 64, 64, device="cuda", dtype=torch.bfloat16)
    t = build_tokenizer("tiny-vit-text")(["a chest x-ray", "head ct scan", "mri", "a fundus photograph"]).cuda()
    with torch.no_grad():
        set_attention(model, "sdpa")
        ref = model.encode_image(x), model.encode_text(t)
        set_attention(model, impl)  # the text tower's causal mask runs as the kernel's causal mode
        out = model.encode_image(x), model.encode_text(t)
    assert torch.allclose(out[0].float(), ref[0].float(), atol=2e-2)
    assert torch.allclose(out[1].float(), ref[1].float(), atol=2e-2)


def test_causal_text_mask_runs_as_the_kernels_causal_mode():
    """The text tower's mask is recognised as causal (so xformers/flash-attention can run it as their causal
    mode); the causal path and the mask path give the same attention; other masks are refused clearly."""
    from vlm.models.attention import attention, is_causal_mask

    torch.manual_seed(0)
    model = MedCLIP("tiny-vit-text")
    mask = model.clip.attn_mask  # open_clip's own (T, T) float mask
    T = mask.shape[0]
    assert is_causal_mask(mask, T) and not is_causal_mask(mask, T + 1)
    assert is_causal_mask(~torch.ones(T, T, dtype=torch.bool).triu(1), T)
    broken = mask.clone()
    broken[0, 1] = 0.0
    assert not is_causal_mask(broken, T) and not is_causal_mask(torch.zeros(T, T), T)
    q, k, v = torch.randn(3, 2, 2, T, 16).unbind(0)
    for impl in ("sdpa", "eager"):
        assert torch.allclose(attention(q, k, v, impl, causal=True), attention(q, k, v, "eager", mask), atol=1e-5)
    from vlm.models.attention import set_attention

    set_attention(model, "sdpa")  # the text tower's layers are known causal: no per-call check of the mask
    text = [m for n, m in model.named_modules() if n.startswith("clip.transformer.") and hasattr(m, "causal_tower")]
    image = [m for n, m in model.named_modules() if n.startswith("clip.visual.") and hasattr(m, "causal_tower")]
    assert text and all(m.causal_tower for m in text) and image and not any(m.causal_tower for m in image)
    with pytest.raises(ValueError, match="use sdpa"):
        attention(q, k, v, "xformers", mask=torch.zeros(T, T))


def test_lora_trains_only_adapters_and_merges_back():
    from vlm.models.lora import inject_lora, merge_lora

    torch.manual_seed(0)
    model = MedCLIP("tiny-vit-text")
    base_keys = set(model.state_dict())
    n = inject_lora(model, model.tower_prefix("image"), r".*\.(c_fc|c_proj)$", r=4, alpha=8)
    assert n == 4  # 2 layers x (c_fc, c_proj)
    trainable = [k for k, p in model.named_parameters() if p.requires_grad and k.startswith("clip.visual.")]
    assert trainable and all("lora_" in k for k in trainable)
    for k, p in model.named_parameters():
        if "lora_B" in k:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero; make the adapter do something
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model.encode_image(x)
    assert merge_lora(model) == 4
    assert set(model.state_dict()) == base_keys
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), before, atol=1e-5)


@pytest.mark.parametrize("tower", ["image", "text"])
def test_lora_on_one_tower_leaves_the_rest_as_configured(tower):
    """peft freezes every non-adapter parameter of the whole model; inject_lora must restore what trained
    outside the tower (the other tower, the logit scale, the concept head) and leave frozen what was."""
    from vlm.models.lora import inject_lora

    model = MedCLIP("tiny-vit-text")
    model.concept_logit_bias.requires_grad_(False)  # frozen before: stays frozen
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    prefix = model.tower_prefix(tower)
    inject_lora(model, prefix, r".*\.(c_fc|c_proj)$", r=4, alpha=8)
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.requires_grad, n
        elif n.startswith(prefix):
            assert not p.requires_grad, n
        else:
            assert p.requires_grad == before[n], n
    assert model.logit_scale.requires_grad and model.concept_logit_scale.requires_grad
    assert not model.concept_logit_bias.requires_grad


def test_weight_decay_groups():
    from train.optim import param_groups

    model = MedCLIP("tiny-vit-text")
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert "clip.logit_scale" in no_decay and "concept_logit_bias" in no_decay
    assert all(("ln_" in n or n.endswith("bias") or "embedding" in n) for n in no_decay if "ln" in n or "bias" in n)
    assert "clip.visual.transformer.resblocks.0.mlp.c_fc.weight" in decay
    assert not any(n.endswith(".bias") or ".ln_" in n for n in decay)


def test_lr_scales_hold_under_ddp(tmp_path):
    """The optimizer is built after parallelize: a DDP-wrapped model's parameter names start with 'module.',
    and the lr_scales prefixes (vision tower at model.vision_lr_scale) must still match them."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from train.optim import param_groups

    model = MedCLIP("tiny-vit-text")
    plain = param_groups(model, 0.1, {"clip.visual.": 0.1})
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        wrapped = param_groups(DistributedDataParallel(model), 0.1, {"clip.visual.": 0.1})
    finally:
        dist.destroy_process_group()
    summary = lambda groups: sorted((g["lr_scale"], g["weight_decay"], len(g["params"])) for g in groups)  # noqa: E731
    assert summary(wrapped) == summary(plain)
    assert any(g["lr_scale"] == 0.1 for g in wrapped)


def test_grad_checkpointing_same_gradients():
    tok = build_tokenizer("tiny-vit-text")
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = MedCLIP("tiny-vit-text")
        model.set_grad_checkpointing(ckpt)
        out = model(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), tok(["a", "b"]))
        contrastive_loss(LossConfig())(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_process_step_matches_one_process(tmp_path, parallel):
    """A full optimizer step under DDP or FSDP2 (gloo, CPU) gives the single-process weights."""
    one, two = one_and_two_processes(REPO / "tests" / "dist" / "fsdp_step.py", tmp_path, parallel)
    assert set(one) == set(two)
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), k


def test_fsdp_mixed_precision_matches_ddp_autocast(tmp_path):
    """train.precision=bf16 under FSDP2 (MixedPrecisionPolicy: bf16 all-gather and compute, fp32 reduce) gives
    DDP-with-autocast's gradients within bf16's tolerance, over fp32 master weights."""
    from safetensors import safe_open

    from conftest import torchrun

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    script = str(REPO / "tests" / "dist" / "fsdp_step.py")
    for parallel in ("ddp", "fsdp"):
        r = torchrun(2, [script, str(tmp_path / f"{parallel}.st"), parallel, "bf16"], env)
        assert r.returncode == 0, r.stderr[-3000:]
    ddp, fsdp = load_file(tmp_path / "ddp.st"), load_file(tmp_path / "fsdp.st")
    with safe_open(tmp_path / "fsdp.st", "pt") as f:
        assert f.metadata()["dtypes"] == "torch.float32"
    grads = [k for k in ddp if k.startswith("grad.")]
    assert len(grads) > 20 and set(grads) == {k for k in fsdp if k.startswith("grad.")}
    for k in grads:
        a, b = ddp[k].flatten(), fsdp[k].flatten()
        assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99 or (a - b).norm() < 1e-3, k
        assert (a - b).norm() <= 0.05 * a.norm() + 1e-4, (k, float((a - b).norm() / a.norm()))
    assert all(v.dtype == torch.float32 for k, v in fsdp.items() if not k.startswith("grad."))


def test_hsdp_on_four_processes_matches_one_process(tmp_path):
    """train.parallel=hsdp with 4 gloo processes as 2 replicas x 2 shards: parameters are sharded on the
    inner mesh dimension and replicated on the outer one, and the step gives the single-process weights (the
    DDP step's, by the test above)."""
    from safetensors import safe_open

    one, four = one_and_two_processes(REPO / "tests" / "dist" / "fsdp_step.py", tmp_path, "hsdp", nproc=4)
    with safe_open(tmp_path / "two.st", "pt") as f:
        assert f.metadata()["placements"] == "(Replicate(), Shard(dim=0))"
    assert set(one) == set(four)
    for k in one:
        assert torch.allclose(one[k], four[k], atol=1e-5), k


def test_text_token_embeddings_in_the_joint_space():
    torch.manual_seed(0)
    model = MedCLIP("tiny-vit-text").eval()
    tok = build_tokenizer("tiny-vit-text")
    t = tok(["a small nodule in the right lung", "head ct"])
    with torch.no_grad():
        pooled, per_token = model.encode_text_with_tokens(t)
        assert torch.allclose(pooled, model.encode_text(t), atol=1e-6)
    assert per_token.shape == (2, 48, 64)
    eot = t.argmax(dim=-1)  # open_clip pools the end-of-text token: its token embedding is the pooled one
    assert torch.allclose(per_token[torch.arange(2), eot], pooled, atol=1e-6)
