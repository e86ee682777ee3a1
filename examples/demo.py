"""moequant end to end on a tiny MoE: quantize on load, LoRA on the quantized experts, save, reload, generate.

    python examples/demo.py            # CPU: well under 2 minutes; uses the GPU when there is one
    python examples/demo.py --steps 60 --layers 6

Everything is local: the checkpoint is a randomly initialised Qwen3-MoE written to --workdir, the
training text is examples/data/tiny_corpus.txt and the tokenizer is plain UTF-8 bytes.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time

import torch

try:
    import moequant
except ImportError:  # run from a source checkout built in place (`python setup.py build_ext --inplace`)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import moequant

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_corpus.txt")
PAD, BOS = 256, 257  # byte ids 0..255, then two specials


class ByteTokenizer:
    """UTF-8 bytes as token ids: no vocabulary to download or train."""

    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return [BOS] + list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def make_checkpoint(path: str, layers: int) -> None:
    """A small Qwen3-MoE (16 experts, top-4) with random weights, saved the way transformers saves it."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=ByteTokenizer.vocab_size, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16,
        num_experts_per_tok=4, max_position_embeddings=256, tie_word_embeddings=False,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=None, initializer_range=0.08,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)


def memory_table(model) -> str:
    from moequant.integrations import memory_summary

    s = memory_summary(model)
    mb = 1024 * 1024
    # "nf4+dq" -> "NF4 + dq" (dq: double-quantized statistics)
    fmt = ", ".join(f.replace("nf4", "NF4").replace("fp4", "FP4").replace("+dq", " + dq") for f in s.formats)
    rows = [
        ("experts, bf16", s.experts_dense_bytes, s.experts_dense_bytes + s.other_bytes,
         s.experts_dense_bytes / s.experts_weights),
        (f"experts, moequant {fmt}", s.experts_packed_bytes, s.total_bytes, s.bytes_per_weight),
    ]
    lines = [f"{'':28}{'experts MB':>12}{'model MB':>12}{'B/weight':>10}"]
    lines += [f"{name:28}{e / mb:12.2f}{t / mb:12.2f}{bpw:10.4f}" for name, e, t, bpw in rows]
    lines.append(f"{s.num_stacks} stacks, {s.experts_dense_bytes / s.experts_packed_bytes:.2f}x smaller experts; "
                 f"num_parameters() = {model.num_parameters():,}; get_memory_footprint() = "
                 f"{model.get_memory_footprint() / mb:.2f} MB")
    return "\n".join(lines)


def batches(ids: torch.Tensor, seq_len: int, batch_size: int, generator: torch.Generator):
    while True:
        starts = torch.randint(0, ids.numel() - seq_len - 1, (batch_size,), generator=generator)
        yield torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--workdir", default=None, help="where the checkpoint and adapter go (default: a temp dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quant-type", default="nf4", choices=moequant.QUANT_TYPES,
                        help="experts format: nf4 (QLoRA), fp4, or int8 row-wise (8-bit LoRA)")
    parser.add_argument("--no-double-quant", action="store_true",
                        help="plain fp32 block statistics instead of double-quantized ones (4-bit formats)")
    args = parser.parse_args()
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("moequant").setLevel(logging.INFO)

    from peft import LoraConfig, PeftModel, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    workdir = args.workdir or tempfile.mkdtemp(prefix="moequant-demo-")
    checkpoint, adapter_dir = os.path.join(workdir, "tiny-qwen3-moe"), os.path.join(workdir, "adapter")
    tok = ByteTokenizer()
    print(f"1. writing a random tiny Qwen3-MoE checkpoint to {checkpoint}")
    make_checkpoint(checkpoint, args.layers)

    def load():
        with moequant.quantize_experts_on_load(quant_type=args.quant_type,
                                               double_quant=False if args.no_double_quant else None):
            return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, device_map=args.device)

    print(f"2. loading on {args.device} with quantize-on-load")
    start = time.perf_counter()
    model = load()
    print(f"   loaded in {time.perf_counter() - start:.2f} s, experts implementation: "
          f"{model.config._experts_implementation!r}\n" + memory_table(model))

    print(f"3. LoRA (r={args.rank}) on the quantized experts and attention, {args.steps} steps")
    lora = LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()  # counts each quantized stack as its E*N*K logical weights
    with open(DATA, encoding="utf-8") as f:
        text = f.read()
    ids = torch.tensor(tok.encode(text)[1:])
    data = batches(ids, args.seq_len, args.batch_size, torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    model.train()
    first = None
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for _ in bar:
        batch = next(data).to(args.device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        first = loss.item() if first is None else first
        bar.set_postfix(loss=f"{loss.item():.3f}")
    print(f"   loss {first:.3f} -> {loss.item():.3f}")

    print(f"4. saving the adapter to {adapter_dir}, reloading it onto a fresh quantized model")
    model.save_pretrained(adapter_dir)
    reloaded = PeftModel.from_pretrained(load(), adapter_dir).eval()
    model.eval()
    prompt = "The keeper"
    prompt_ids = torch.tensor([tok.encode(prompt)], device=args.device)
    with torch.no_grad():
        diff = (reloaded(prompt_ids).logits - model(prompt_ids).logits).abs().max().item()
    print(f"   reloaded adapter vs trained model: max |logit difference| = {diff:.3g}")
    with torch.no_grad():
        out = reloaded.generate(input_ids=prompt_ids, max_new_tokens=120, do_sample=False, pad_token_id=PAD)
    print("5. greedy generation from the reloaded adapter:\n   " + repr(tok.decode(out[0].tolist())))


if __name__ == "__main__":
    main()
