"""Write the tiny Qwen3-MoE checkpoint, tokenizer and dataset that ``tiny-qwen3-moe-qlora.yml`` trains on.

    python examples/axolotl/make_tiny.py [DIR]     # default ./moequant-tiny

DIR/model holds a randomly initialised 2-layer Qwen3-MoE (8 experts, hidden 64) with a
character-level tokenizer, DIR/data.jsonl a few hundred short lines of text. Everything is
generated locally (no downloads), so the config runs on any machine, CPU included.
"""

from __future__ import annotations

import json
import os
import string
import sys

import torch

# Characters the tokenizer knows; with the special tokens the vocabulary stays below the model's 96.
_CHARS = string.ascii_lowercase + string.digits + " .,:;!?'-\n"
_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB_SIZE = 96

_SENTENCES = [
    "the lighthouse keeper climbed the stairs every evening to light the lamp.",
    "from the top he could see the harbour, the boats and the long grey sea.",
    "the boats came home when the lamp was lit, one after another.",
    "he counted them as they passed the rocks: one, two, three, four, five.",
    "when the fog rolled in he rang the bell, and the sailors listened for it.",
    "in the morning he wrote the weather in a book and went to sleep.",
]


def save_tokenizer(directory: str) -> None:
    """A character-level fast tokenizer: one token per character, ``<s>`` prepended, ``</s>`` as eos."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIALS + list(_CHARS))}
    assert len(vocab) <= VOCAB_SIZE
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)


def save_model(directory: str, seed: int = 0) -> None:
    """A 2-layer Qwen3-MoE with 8 experts of width 32, bf16, expert weights drawn with std 0.2."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:  # fused experts: the default std 0.02 makes them almost inert
                p.normal_(0.0, 0.2)
    model.save_pretrained(directory)


def save_dataset(path: str, rows: int = 256) -> None:
    """``{"text": ...}`` lines (Axolotl's ``completion`` type), each two sentences of the tiny story."""
    with open(path, "w") as f:
        for i in range(rows):
            text = _SENTENCES[i % len(_SENTENCES)] + " " + _SENTENCES[(i * 5 + 1) % len(_SENTENCES)]
            f.write(json.dumps({"text": text}) + "\n")


def make_tiny(directory: str) -> str:
    model_dir = os.path.join(directory, "model")
    os.makedirs(model_dir, exist_ok=True)
    save_model(model_dir)
    save_tokenizer(model_dir)
    save_dataset(os.path.join(directory, "data.jsonl"))
    return directory


if __name__ == "__main__":
    print(make_tiny(sys.argv[1] if len(sys.argv) > 1 else "moequant-tiny"))
