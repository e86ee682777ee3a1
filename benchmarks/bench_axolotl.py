"""Axolotl with moequant's plugin against Axolotl's own ``quantize_moe_experts``, on one GPU.

    python benchmarks/bench_axolotl.py make-checkpoint DIR [--layers 2]   # Qwen3-30B-A3B-shaped, random, + data
    python benchmarks/bench_axolotl.py bf16-load DIR                       # reference: plain bf16 from_pretrained
    python benchmarks/bench_axolotl.py train CONFIG WORKDIR LABEL [key=json ...]

``train`` runs Axolotl's own code (``load_cfg``, ``load_datasets``, ``axolotl.train.train``) and
prints one ``BENCH_AXOLOTL {json}`` line: load time and peak allocated memory of
``ModelLoader.load``, memory after it, loss per step, step times, peak allocated memory while
training. benchmarks/axolotl_device_run.sh runs the comparison; figures are timings of one run.
"""

from __future__ import annotations

import cProfile
import io
import json
import os
import pstats
import sys
import time

import torch

os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples", "axolotl"))

GIB = 2**30
CUDA = torch.cuda.is_available()


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _peak() -> float:
    return torch.cuda.max_memory_allocated() / GIB if CUDA else 0.0


def _allocated() -> float:
    return torch.cuda.memory_allocated() / GIB if CUDA else 0.0


def _reset() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def make_checkpoint(directory: str, layers: int, tiny: bool = False) -> dict:
    """Qwen3-30B-A3B's shapes (hidden 2048, 128 experts of width 768, top-8, vocab 151936), ``layers`` layers."""
    from make_tiny import save_dataset, save_tokenizer
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    if tiny:  # the dry run on a machine without a GPU: same code path, tiny shapes
        config.update(dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2, vocab_size=96))
    start = time.perf_counter()
    torch.manual_seed(0)
    with torch.device("cuda" if CUDA else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    os.makedirs(os.path.join(directory, "model"), exist_ok=True)
    model.save_pretrained(os.path.join(directory, "model"))
    save_tokenizer(os.path.join(directory, "model"))
    save_dataset(os.path.join(directory, "data.jsonl"), rows=4096)
    return {"layers": layers, "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": time.perf_counter() - start}


def bf16_load(directory: str) -> dict:
    from transformers import AutoModelForCausalLM

    _reset()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(os.path.join(directory, "model"), dtype=torch.bfloat16,
                                                 device_map={"": 0} if CUDA else None)
    _sync()
    seconds = time.perf_counter() - start
    result = {"load_s": seconds, "load_peak_gib": _peak(), "model_gib": _allocated()}
    del model
    return result


def train(config: str, workdir: str, label: str, pairs: list[str]) -> dict:
    from transformers import TrainerCallback

    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.loaders.model import ModelLoader
    from axolotl.train import train as axolotl_train

    data = os.path.join(workdir, "ckpt")
    overrides = dict(
        base_model=os.path.join(data, "model"),
        datasets=[{"path": os.path.join(data, "data.jsonl"), "ds_type": "json", "type": "completion"}],
        dataset_prepared_path=os.path.join(workdir, "prepared"),
        output_dir=os.path.join(workdir, f"out-{label}"),
        dataset_num_proc=4,
    )
    for pair in pairs:
        key, _, value = pair.partition("=")
        overrides[key] = json.loads(value)
    result: dict = {"label": label, "overrides": {k: v for k, v in overrides.items() if k not in ("datasets",)}}

    original_load = ModelLoader.load
    # BENCH_AXOLOTL_PROFILE=1: cProfile the load (its time then includes the profiler's overhead)
    profile = bool(os.environ.get("BENCH_AXOLOTL_PROFILE"))

    def timed_load(self, *args, **kwargs):
        _sync()
        _reset()
        profiler = cProfile.Profile() if profile else None
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        out = original_load(self, *args, **kwargs)
        _sync()
        seconds = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
            text = io.StringIO()
            stats = pstats.Stats(profiler, stream=text)
            stats.sort_stats("cumulative").print_stats(45)
            stats.sort_stats("tottime").print_stats(25)
            result["load_profile"] = text.getvalue().splitlines()
        result.update(load_s=seconds, load_peak_gib=_peak(), after_load_gib=_allocated())
        return out

    ModelLoader.load = timed_load

    class StepTimes(TrainerCallback):
        def __init__(self):
            self.times = []
            self.start = None

        def on_train_begin(self, args, state, control, **kwargs):
            _reset()

        def on_step_begin(self, args, state, control, **kwargs):
            _sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync()
            self.times.append(time.perf_counter() - self.start)

    steps = StepTimes()
    import transformers

    original_init = transformers.Trainer.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(steps)

    transformers.Trainer.__init__ = init
    cfg = load_cfg(config, **overrides)
    dataset_meta = load_datasets(cfg=cfg, cli_args=TrainerCliArgs())
    _, _, trainer = axolotl_train(cfg=cfg, dataset_meta=dataset_meta)
    result.update(
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        step_s=steps.times,
        step_s_median=sorted(steps.times)[len(steps.times) // 2] if steps.times else None,
        train_peak_gib=_peak(),
    )
    return result


def main(argv: list[str]) -> None:
    mode = argv[0] if argv else None
    if mode in ("-h", "--help"):
        print(__doc__)
        return
    if mode == "make-checkpoint":
        layers = int(argv[argv.index("--layers") + 1]) if "--layers" in argv else 2
        report = make_checkpoint(argv[1], layers, tiny="--tiny" in argv)
    elif mode == "bf16-load":
        report = bf16_load(argv[1])
    elif mode == "train":
        report = train(argv[1], argv[2], argv[3], argv[4:])
    else:
        raise SystemExit(__doc__)
    print("BENCH_AXOLOTL " + json.dumps({"mode": mode, **report}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
