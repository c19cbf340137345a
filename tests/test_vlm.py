"""The assistant model: open_clip ViT -> CLIPVisionModel exactly, LLaVA assembly with a tiny Llama,
stage freezing, and the transformers export loaded back by the Auto classes with the same logits."""
from __future__ import annotations

import pytest
import torch

from vlm.models.clip import MedCLIP
from vlm.models.vlm import build_llava, freeze_for_stage, openclip_vit_to_hf


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return MedCLIP("tiny-vit-text").eval()


def test_openclip_vit_converts_exactly(clip):
    hf = openclip_vit_to_hf(clip.clip.visual)
    x = torch.randn(2, 3, 64, 64)
    visual = clip.clip.visual
    with torch.no_grad():
        ours = clip.encode_image(x, normalize=False)  # ln_post(CLS) @ proj
        out = hf(pixel_values=x, output_hidden_states=True)
        theirs = out.pooler_output @ visual.proj
        # the penultimate block's output (what LLaVA reads) agrees too
        h = visual._embeds(x)
        for blk in visual.transformer.resblocks[:-1]:
            h = blk(h)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(out.hidden_states[-2], h, atol=1e-5)
    assert len(out.hidden_states) == len(visual.transformer.resblocks) + 1


def tiny_llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))


def test_llava_assembly_stage_freezing_and_export(clip, tmp_path):
    from transformers import AutoModelForImageTextToText

    vision = openclip_vit_to_hf(clip.clip.visual)
    llm = tiny_llama(100)
    model = build_llava(vision, llm, image_token_id=99).eval()
    n = model.config.image_seq_length
    assert n == 64  # (64 / 8)^2 patches, CLS dropped
    ids = torch.tensor([[1, 5] + [99] * n + [7, 8, 9]])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        logits = model(input_ids=ids, pixel_values=pixels).logits
    assert logits.shape == (1, ids.shape[1], 100) and torch.isfinite(logits).all()
    freeze_for_stage(model, 1)
    trainable = {n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"multi_modal_projector"}
    freeze_for_stage(model, 2)
    assert any(p.requires_grad for p in model.model.language_model.parameters())
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    model.save_pretrained(tmp_path / "export")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids, pixel_values=pixels).logits, logits, atol=1e-4)


def test_load_vision_tower_from_folders(clip, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from vlm.models.vlm import load_vision_tower

    hf = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=8))
    hf.save_pretrained(tmp_path / "hfclip")
    assert isinstance(load_vision_tower(tmp_path / "hfclip"), CLIPVisionModel)
    from vlm.hub import export_open_clip

    export_open_clip(clip, tmp_path / "oc", [0.5] * 3, [0.5] * 3)
    tower = load_vision_tower(tmp_path / "oc")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(tower(pixel_values=x).pooler_output @ clip.clip.visual.proj,
                              clip.encode_image(x, normalize=False), atol=1e-5)


def assistant_pair(clip):
    """The same assistant twice: LLM attention through sdpa (our packed-aware sdpa_varlen) and eager."""
    from test_chat import CHATML, make_tokenizer

    from vlm.models.vlm import build_llm

    tok = make_tokenizer(CHATML)
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
    models = []
    for impl in ("sdpa", "eager"):
        torch.manual_seed(3)
        llm = build_llm(None, cfg, tok, impl)
        model = build_llava(openclip_vit_to_hf(clip.clip.visual), llm, tok.convert_tokens_to_ids("<image>"))
        freeze_for_stage(model, 2)
        models.append(model)
    models[1].load_state_dict(models[0].state_dict())
    assert models[0].config.text_config._attn_implementation == "sdpa_varlen"
    assert models[1].config.text_config._attn_implementation == "eager"
    return tok, models


def test_sdpa_eager_logits_and_packed_padded_grouped_losses_agree(clip):
    """One set of conversations (different images, lengths, one of them twice) through every batching mode
    and both attention implementations: same logits (padded batch), same loss and gradients."""
    from train.distributed import Dist
    from train.instruct import InstructCollate, InstructTask
    from train.trainer import StepContext
    from vlm.data.chat import ChatConfig, encode, normalize_conversation

    tok, (sdpa, eager) = assistant_pair(clip)
    n_img = sdpa.config.image_seq_length
    answers = ["Yes.", "A small nodule in the right upper lung.", "No.", "Chest x-ray, frontal view.", "Yes."]
    g = torch.Generator().manual_seed(0)
    examples = []
    for i, a in enumerate(answers):
        conv = [{"from": "human", "value": "<image>\nWhat is seen here?" + " Describe." * i}, {"from": "gpt", "value": a}]
        ids, labels = encode(normalize_conversation(conv, 1), tok, ChatConfig(), n_img)
        examples.append({"key": f"k{i}", "input_ids": ids, "labels": labels,
                         "pixel_values": [torch.randn(3, 64, 64, generator=g)]})
    padded = InstructCollate(False, 0, tok.pad_token_id)(examples)
    with torch.no_grad():
        inputs = {k: padded[k] for k in ("input_ids", "attention_mask", "pixel_values")}
        a, b = sdpa.eval()(**inputs).logits, eager.eval()(**inputs).logits
    real = padded["attention_mask"].bool()
    assert torch.allclose(a[real], b[real], atol=1e-5)

    longest = max(len(e["input_ids"]) for e in examples)
    batches = {"padded": padded,
               "grouped": InstructCollate(False, 0, tok.pad_token_id, group_size=2)(examples),
               "packed": InstructCollate(True, 2 * longest, tok.pad_token_id)(examples)}
    assert batches["packed"]["input_ids"].shape[0] < len(examples)  # several conversations per row
    assert len(batches["grouped"]["groups"]) == 3
    results = {}
    for model in (sdpa, eager):
        model.train()
        for name, batch in batches.items():
            model.zero_grad()
            out = InstructTask().train_step(model, [batch], StepContext(model, Dist(), "fp32"))
            grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
            results[(model.config.text_config._attn_implementation, name)] = (out["loss"], out["tokens"], grads)
    ref_loss, ref_tokens, ref_grads = results[("eager", "padded")]
    for key, (loss, tokens, grads) in results.items():
        assert tokens == ref_tokens, key
        assert abs(loss - ref_loss) < 1e-5, (key, loss, ref_loss)
        for x, y in zip(grads, ref_grads):
            assert torch.allclose(x, y, atol=1e-5), key


def tiny_assistant(clip, projector="mlp2x_gelu"):
    vision = openclip_vit_to_hf(clip.clip.visual)
    return build_llava(vision, tiny_llama(100), image_token_id=99, projector=projector).eval()


def sample_inputs(model):
    ids = torch.tensor([[1, 5] + [99] * model.config.image_seq_length + [7, 8, 9]])
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))}


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu", "mlp3x_gelu"])
def test_projectors_and_their_transformers_export(clip, projector, tmp_path):
    from transformers import AutoModelForImageTextToText

    from vlm.models.vlm import stock_projector

    model = tiny_assistant(clip, projector)
    linears = [m for m in model.model.multi_modal_projector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == {"linear": 1, "mlp2x_gelu": 2, "mlp3x_gelu": 3}[projector]
    inputs = sample_inputs(model)
    with torch.no_grad():
        logits = model(**inputs).logits
    if projector == "mlp3x_gelu":
        with pytest.raises(ValueError, match="no stock transformers counterpart"):
            stock_projector(model)
        return
    stock_projector(model)
    model.save_pretrained(tmp_path / "hf")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.allclose(again(**inputs).logits, logits, atol=1e-4)
    with pytest.raises(ValueError, match="mlp<N>x_gelu"):
        tiny_assistant(clip, "mlp_gelu")


@pytest.mark.parametrize("method", ["dora", "rslora", "loha", "lokr"])
def test_peft_methods_train_only_adapters_and_merge_exactly(clip, method):
    from train.config import LLM_LORA_TARGET
    from vlm.models.lora import inject_lora, merge_lora

    model = tiny_assistant(clip)
    freeze_for_stage(model, 2)
    base_keys = set(model.state_dict())
    n = inject_lora(model, "model.language_model.", LLM_LORA_TARGET, r=4, alpha=8, method=method)
    assert n > 0
    trainable = [k for k, p in model.named_parameters() if p.requires_grad and k.startswith("model.language_model.")]
    assert trainable and all(k not in base_keys for k in trainable)  # only the new adapter tensors
    inputs = sample_inputs(model)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(2):  # move the adapters away from their identity start
        model(**inputs).logits.square().mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        before = model(**inputs).logits
    assert merge_lora(model) == n
    assert set(model.state_dict()) == base_keys
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, before, atol=1e-4)


def test_qlora_settings_are_checked_before_anything_loads():
    from train.config import AssistantModelConfig, LoraConfig
    from vlm.models.vlm import quantization

    with pytest.raises(ValueError, match="QLoRA"):
        AssistantModelConfig(vision="v", llm="x", stage=2, llm_quantize="4bit")  # no adapters
    with pytest.raises(ValueError, match="none, 4bit or 8bit"):
        AssistantModelConfig(vision="v", llm="x", stage=2, llm_quantize="3bit", lora=LoraConfig(r=8))
    AssistantModelConfig(vision="v", llm="x", stage=2, llm_quantize="4bit", lora=LoraConfig(r=8))
    assert quantization("none") == {}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="bitsandbytes|CUDA GPU"):
            quantization("4bit")


def test_vision_tower_unfreezes_with_its_own_learning_rate(clip):
    from train.config import OptimConfig
    from train.optim import build_optimizer

    model = tiny_assistant(clip)
    freeze_for_stage(model, 2, train_vision=True)
    trainable = {n for n, p in model.model.vision_tower.named_parameters() if p.requires_grad}
    assert any("layers.0." in n for n in trainable) and any("embeddings" in n for n in trainable)
    # LLaVA reads the penultimate layer: the last layer and the post-norm would get no gradient
    assert not any("layers.1." in n or "post_layernorm" in n for n in trainable)
    inputs = sample_inputs(model)
    model(**inputs).logits.sum().backward()
    assert all(p.grad is not None for n, p in model.model.vision_tower.named_parameters() if n in trainable)
    opt = build_optimizer(model, OptimConfig(lr=1e-3), {"model.vision_tower.": 0.1})
    vision = {id(p) for p in model.model.vision_tower.parameters() if p.requires_grad}
    for g in opt.param_groups:
        in_vision = {id(p) in vision for p in g["params"]}
        assert len(in_vision) == 1  # a group is all vision tower or none of it
        assert g["lr"] == pytest.approx(1e-4 if in_vision.pop() else 1e-3)
    freeze_for_stage(model, 2)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(clip):
    from train.instruct import enable_grad_checkpointing

    grads = []
    for ckpt in (False, True):
        model = tiny_assistant(clip)
        freeze_for_stage(model, 2)
        model.train()
        if ckpt:
            enable_grad_checkpointing(model)
            assert model.model.language_model.is_activation_checkpointing
        model(**sample_inputs(model), use_cache=False).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1]) and grads[0]
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n
