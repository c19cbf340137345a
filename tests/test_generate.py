"""Batched greedy generation with left padding gives the same answers as one request at a time."""
import torch

from eval.generate import generate
from test_chat import CHATML, make_tokenizer
from vlm.data.chat import normalize_conversation
from vlm.models.clip import MedCLIP
from vlm.models.vlm import build_llava, openclip_vit_to_hf


def test_batched_equals_sequential():
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(CHATML)
    torch.manual_seed(0)
    clip = MedCLIP("tiny-vit-text").eval()
    llm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=512))
    image_id = tok.convert_tokens_to_ids("<image>")
    model = build_llava(openclip_vit_to_hf(clip.clip.visual), llm, image_token_id=image_id).eval()
    n = model.config.image_seq_length
    questions = ["Is there a nodule in the right upper lung?", "What modality is this?", "Describe the image."]
    requests = []
    for i, q in enumerate(questions):
        msgs = normalize_conversation([{"from": "human", "value": "<image>\n" + q}, {"from": "gpt", "value": "x"}], 1)
        prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ids = [t for t_ in ids for t in ([t_] * n if t_ == image_id else [t_])]
        requests.append({"input_ids": ids, "pixel_values": torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(i))})
    assert len({len(r["input_ids"]) for r in requests}) == 3  # different lengths: left padding matters
    batched = generate(model, tok, requests, batch_size=3, max_new_tokens=8)
    single = [generate(model, tok, [r], batch_size=1, max_new_tokens=8)[0] for r in requests]
    assert batched == single
    assert all(isinstance(a, str) for a in batched) and any(batched)
