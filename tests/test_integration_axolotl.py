"""``quantize_moe_experts: true`` through moequant in real Axolotl 0.21.0, on the CPU.

Each case runs ``tests/_axolotl_driver.py`` in a child process (Axolotl patches transformers,
PEFT and its singletons for a process' lifetime): the config ``examples/axolotl/tiny-qwen3-moe-qlora.yml``
goes through Axolotl's ``load_cfg`` (plugin registration, pydantic validation), the model through
its ``ModelLoader`` (its own loader and PEFT patches, bitsandbytes 4/8-bit ``nn.Linear``), training
through ``axolotl.train.train``, on a tiny Qwen3-MoE checkpoint and dataset written by
``examples/axolotl/make_tiny.py``.

Device checks patched (and only these): the 8-bit LoRA run trains in bf16, which
``transformers.training_args.is_torch_bf16_gpu_available`` refuses without a GPU (Axolotl has no
``use_cpu`` setting; Axolotl's 8-bit path forces fp16 otherwise, whose mixed fp32 router does not
run without GPU autocast); the CPU-only error case sets ``torch.cuda.is_available`` to False.
The QLoRA runs patch nothing.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("axolotl")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(REPO, "tests", "_axolotl_driver.py")
CONFIG = os.path.join(REPO, "examples", "axolotl", "tiny-qwen3-moe-qlora.yml")


def run_driver(*args) -> tuple[dict, str]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, DRIVER, *args], capture_output=True, text=True, env=env, timeout=600)
    log = proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("MOEQUANT_REPORT ")]
    assert lines, f"driver printed no report (exit {proc.returncode}):\n{log[-4000:]}"
    report = json.loads(lines[-1].split(" ", 1)[1])
    assert "driver_error" not in report, report["driver_error"]
    return report, log


@pytest.fixture(scope="module")
def qlora_runs(tmp_path_factory):
    """The tiny QLoRA config trained twice in one work directory: the second run finds the cache."""
    workdir = str(tmp_path_factory.mktemp("axolotl"))
    first = run_driver("train", CONFIG, workdir)
    second = run_driver("train", CONFIG, workdir)
    return first, second


def _check_run(report: dict, log: str) -> None:
    assert report["cfg_quantize_moe_experts"] is False  # taken over before validation
    assert report["cfg_moequant_quantize_experts"] is True
    assert report["device_map"] == "auto"  # not Axolotl's {"": LOCAL_RANK} override
    losses = report["losses"]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.1, losses
    assert report["axolotl_quantized"] == 0  # Axolotl's own quantize_moe_experts patch stayed off
    assert report["moe_experts_quantized_flag"] is True  # prepare_model_for_kbit_training skipped
    assert report["stacks"] == 4
    assert report["experts_implementation"] == ["moequant"]
    # LoRA once per expert stack, nested as PEFT nests them on the dense model
    assert report["wrappers"] == {f"model.layers.{i}.mlp.experts": ["down_proj", "gate_up_proj"] for i in (0, 1)}
    assert report["setter_restored"] and report["injection_removed"]  # nothing left patched after the load
    # the saved adapter has exactly the keys and shapes of the same adapter on the unquantized model
    assert report["adapter_keys"] == report["dense"]["keys"]
    # parameter counts equal the unquantized model's with the same adapter, and Axolotl's log says so
    assert report["peft_counts"] == [report["dense"]["trainable"], report["dense"]["total"]]
    assert f"trainable params: {report['dense']['trainable']:,} || all params: {report['dense']['total']:,}" in log
    assert "[axolotl.integrations.moequant] moequant: 4 expert stacks:" in log  # the memory line, at INFO
    assert "MB dense ->" in log


def test_qlora_trains_through_moequant_in_axolotl(qlora_runs):
    (report, log), _ = qlora_runs
    _check_run(report, log)
    assert report["quantizations"] == 4  # every stack quantized exactly once
    assert "nf4 experts with double-quantized statistics" in log  # Axolotl's QLoRA default: double quant
    assert "quantized expert stacks to be written to the cache" in log and "after the load" in log


def test_second_run_loads_the_experts_cache(qlora_runs):
    (first, _), (report, log) = qlora_runs
    _check_run(report, log)
    assert report["quantizations"] == 0  # nothing re-quantized
    assert "experts cache hit" in log and "from the cache" in log
    assert "read ahead of the load" in log  # the entry was read while Axolotl validated and loaded data
    assert report["losses"][0] == pytest.approx(first["losses"][0], abs=1e-4)  # the same model


def test_8bit_lora_trains_int8_experts(tmp_path):
    report, log = run_driver("train", CONFIG, str(tmp_path), 'adapter="lora"', "load_in_4bit=false",
                             "load_in_8bit=true", "bf16=true")
    _check_run(report, log)
    assert report["quantizations"] == 4
    assert "handled by moequant (int8 experts" in log and " int8 (1.0" in log


def test_clear_errors(tmp_path):
    report, _ = run_driver("errors", str(tmp_path))
    expected = {
        "unsupported_architecture": ["model type 'llama'", "LlamaForCausalLM", "MoE-like modules found: none"],
        "lora_dropout": ["needs lora_dropout: 0", "got lora_dropout: 0.1"],
        "blocksize": ["moequant_blocksize must be a power of two in [32, 4096], got 48"],
        "fuse": ["moequant_fuse must be one of", "'gpu'"],
        "quant_type": ["bnb_4bit_quant_type must be one of ('nf4', 'fp4')", "'int4'"],
        "lora_without_8bit": ["adapter: lora needs load_in_8bit: true"],
        "lora_target_linear_twice": ["lora_target_linear", "targeted twice", "gate_up_proj"],
        "cpu_only_gpu_config": ["no CUDA device", "device_map: {'': 0}"],
    }
    for case, fragments in expected.items():
        assert report[case].startswith("ValueError: "), (case, report[case])
        for fragment in fragments:
            assert fragment in report[case], (case, fragment, report[case])
    # a load failing after pre_model_load leaves transformers and PEFT unpatched
    assert report["failing_load"] == "unpatched"
