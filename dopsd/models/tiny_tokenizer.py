"""A tiny byte-level BPE tokenizer in the Qwen2/Qwen3 format, trained locally and deterministically.

Tokenizers cannot be downloaded here, and tests must go through the real `AutoTokenizer` loading code, so
the tiny checkpoints carry one of these. It uses Qwen2's own pre-tokenization (so `Qwen2TokenizerFast`
rebuilds the same pipeline on load) and the Qwen chat and vision special tokens.
"""
from __future__ import annotations

import json

# Qwen2's pre-tokenization split (the pattern transformers' Qwen2 tokenizer applies).
_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
          r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]

# Qwen3-style chat template: string content (Z-Image's student prompt) or a list of image/text parts
# (the teacher's Qwen3-VL turn). Only enable_thinking=False inserts the empty think block, as in Qwen3.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}{%- endif -%}"
)


def _corpus() -> list[str]:
    subjects = ["a cat", "a dog", "a red circle", "a blue square", "a green triangle", "an old man", "a robot",
                "a small house", "the mountain", "a bowl of fruit", "a wooden boat", "a yellow star", "[V]"]
    places = ["on a green field", "under the blue sky", "in a busy market", "by the river", "on a snowy hill",
              "on the kitchen table", "in the center", "at the top left", "at the bottom right"]
    styles = ["photo", "painting", "sketch", "render", "illustration", "drawing in [V] style"]
    lines = []
    for i, s in enumerate(subjects):
        for j, p in enumerate(places):
            st = styles[(i + 2 * j) % len(styles)]
            lines.append(f"A {st} of {s} {p}, high quality, detailed. The light is soft and warm.")
    lines.append("Small large striped dotted plain bright dark. Numbers 0123456789! What's this? It's fine.")
    return lines


def train_tiny_tokenizer(vocab_size: int = 768, extra_corpus: tuple[str, ...] = ()):
    """A `Qwen2TokenizerFast` with the chat template; identical bytes on every run. `extra_corpus` adds
    lines (e.g. a toy world's captions, so its words become single tokens)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte: no OOV
    tok.train_from_iterator(_corpus() + list(extra_corpus), trainer)
    bpe = json.loads(tok.to_str())["model"]
    hf = Qwen2TokenizerFast(vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]],
                            extra_special_tokens=SPECIAL_TOKENS[1:], model_max_length=1024)
    hf.chat_template = CHAT_TEMPLATE
    return hf
