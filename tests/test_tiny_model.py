"""`dopsd make-tiny-model`: deterministic, loadable by the real classes, with a grafted teacher encoder."""
import hashlib

import torch
from transformers import AutoTokenizer, Qwen3Model

from dopsd.models import make_tiny_model
from dopsd.models.zimage import graft_language_model


def _digest(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_tiny_model_is_deterministic_and_complete(tiny_model_dir, tmp_path):
    make_tiny_model("zimage", str(tmp_path / "again"), seed=0)
    assert _digest(tiny_model_dir) == _digest(tmp_path / "again")
    names = set(_digest(tiny_model_dir))
    for required in ("model_index.json", "transformer/diffusion_pytorch_model.safetensors",
                     "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                     "tokenizer/tokenizer.json", "scheduler/scheduler_config.json",
                     "teacher_encoder/model.safetensors", "teacher_encoder/preprocessor_config.json"):
        assert required in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".ckpt")) for n in names)  # safetensors only
    make_tiny_model("zimage", str(tmp_path / "other"), seed=1)
    assert _digest(tmp_path / "other")["transformer/diffusion_pytorch_model.safetensors"] != \
        _digest(tiny_model_dir)["transformer/diffusion_pytorch_model.safetensors"]


def test_tokenizer_chat_template_and_specials(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir / "tokenizer")
    text = tok.apply_chat_template([{"role": "user", "content": "a cat"}], tokenize=False,
                                   add_generation_prompt=True, enable_thinking=True)
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 1
    assert tok.decode(tok("any text, even ünïcode!").input_ids) == "any text, even ünïcode!"


def test_teacher_encoder_shares_the_text_encoder_weights(backend):
    vl, _, _ = backend.teacher_encoder()
    lm = vl.model.language_model
    assert all(a is b for a, b in zip(backend.text_encoder.parameters(), lm.parameters()))
    # text only, the grafted language model is the text encoder (M-RoPE with equal axes = 1D RoPE)
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    a = backend.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    b = lm(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(a, b, atol=1e-6)


def test_graft_rejects_mismatched_language_model(backend):
    import pytest
    from transformers import Qwen3Config

    vl, _, _ = backend.teacher_encoder()
    other = Qwen3Model(Qwen3Config(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=1, num_key_value_heads=1, head_dim=16))
    with pytest.raises(ValueError, match="does not match the text encoder"):
        graft_language_model(vl, other)
