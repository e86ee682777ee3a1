"""The benchmark scripts stay runnable where CI can reach them: every script answers --help, a CPU
smoke run writes its record, and every record starts with the same run header (results_io)."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCHMARKS)
import results_io  # noqa: E402


def _scripts():
    for path in sorted(glob.glob(os.path.join(BENCHMARKS, "*.py"))):
        with open(path) as f:
            if 'if __name__ == "__main__":' in f.read():
                yield os.path.basename(path)


def _run(args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_every_script_is_found():
    # The scripts the README documents; a rename must update this list (and the README).
    assert {"bench_experts.py", "bench_nf4.py", "bench_decode_graph.py", "bench_generate.py",
            "bench_load_train.py", "bench_axolotl.py"} <= set(_scripts())


@pytest.mark.parametrize("script", list(_scripts()))
def test_script_answers_help(script):
    r = _run([os.path.join("benchmarks", script), "--help"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout or "python benchmarks/" in r.stdout


def test_default_results_path_names_the_device():
    path = results_io.default_results_path("bench_x", "NVIDIA H200 (MIG 1g.18gb)")
    assert path == os.path.join(BENCHMARKS, "results", "bench_x-NVIDIA_H200_MIG_1g_18gb.json")


def test_run_metadata_and_write_results(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEQUANT_DECODE_MMA", "0")
    monkeypatch.setenv("NOT_MOEQUANT_X", "1")
    meta = results_io.run_metadata("cpu", ("transformers", "no-such-package-moequant"))
    assert meta["environment"].get("MOEQUANT_DECODE_MMA") == "0" and "NOT_MOEQUANT_X" not in meta["environment"]
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__ and meta["cuda"] == torch.version.cuda
    transformers = pytest.importorskip("transformers")
    assert meta["transformers"] == transformers.__version__
    assert meta["no-such-package-moequant"] is None
    assert meta["command"].startswith("python ")
    out = tmp_path / "nested" / "folder" / "r.json"
    written = results_io.write_results(str(out), dict(meta, rows=[{"a": 1.5}]))
    assert written == str(out)
    assert json.loads(out.read_text()) == dict(meta, rows=[{"a": 1.5}])


def test_cpu_smoke_run_writes_its_record(tmp_path):
    out = tmp_path / "call_overhead.json"
    r = _run(["benchmarks/bench_call_overhead.py", "--device", "cpu", "--shapes", "tiny", "--calls", "3",
              "--rounds", "2", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads(out.read_text())
    header = results_io.run_metadata(results_io.device_name("cpu"))
    for key in ("device", "torch", "cuda", "python"):
        assert record[key] == header[key], key
    assert record["command"].startswith("python benchmarks/bench_call_overhead.py --device cpu")
    assert record["rows"] and all(row["issue_us"] > 0 for row in record["rows"])


def test_cpu_experts_smoke_run_writes_its_record(tmp_path):
    out = tmp_path / "cpu_experts.json"
    r = _run(["benchmarks/bench_cpu_experts.py", "--shapes", "tiny", "--tokens", "1,30", "--formats", "nf4_dq,int8",
              "--reps", "1", "--lora-storages", "peft,bf16", "--lora-rank", "4", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["device"] == results_io.device_name("cpu") and record["threads"] >= 1
    impls = {(row["impl"], row.get("strategy")) for row in record["rows"]}
    assert impls == {("bf16", None), ("fp32", None), ("moequant[nf4_dq]+lora4", "default")} | {
        (f"moequant[{f}]", s) for f in ("nf4_dq", "int8") for s in ("default", "blas_only")}
    assert {(row["T"], row["lora_storage"]) for row in record["rows"] if "lora_storage" in row} == {
        (t, s) for t in (1, 30) for s in ("peft", "bf16")}
    for row in record["rows"]:
        assert row["nograd_ms"] > 0
        if row["impl"].startswith("moequant") and "lora_storage" not in row:
            assert row["fwd_bwd_ratio_fp32"] > 0 and row["nograd_ratio_bf16"] > 0


def test_decode_graph_chain_orders_the_calls():
    # --chain: every call after the first gets its input through the previous call's output (same values),
    # so a captured graph cannot start a call before the one before it ends, as in a model.
    bench_decode_graph = pytest.importorskip("bench_decode_graph")
    gen = torch.Generator().manual_seed(0)
    inputs = [(torch.randn(2, 4, generator=gen), None, None) for _ in range(3)]
    seen = []

    def call(x, idx, w):
        seen.append(x)
        # the first output is NaN (x + 0 * NaN is NaN: the next input read it), the others finite
        return torch.full_like(x, float("nan") if len(seen) == 1 else 1.0)

    bench_decode_graph.calls_of(call, inputs, chain=False)()
    assert all(s is x for s, (x, _, _) in zip(seen, inputs))
    seen.clear()
    bench_decode_graph.calls_of(call, inputs, chain=True)()
    assert seen[0] is inputs[0][0] and all(s is not x for s, (x, _, _) in zip(seen[1:], inputs[1:]))
    assert seen[1].isnan().all()  # it did read the previous output
    torch.testing.assert_close(seen[2], inputs[2][0], rtol=0, atol=0)


def test_decode_graph_env_rows(tmp_path, monkeypatch):
    """--env-row NAME=VALUE adds the first format's rows (LoRA included) timed with that setting,
    labelled and recorded in the row; the setting holds only while those rows run."""
    out = tmp_path / "decode_graph.json"
    r = _run(["benchmarks/bench_decode_graph.py", "--device", "cpu", "--shapes", "tiny", "--tokens", "1",
              "--formats", "nf4,nf4_dq", "--lora-rank", "4", "--reps", "1", "--calls", "2",
              "--env-row", "MOEQUANT_DECODE_MMA_STAGES=2", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["format"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"nf4", "nf4_dq", "nf4+lora4", "nf4-MOEQUANT_DECODE_MMA_STAGES=2",
                         "nf4+lora4-MOEQUANT_DECODE_MMA_STAGES=2"}, sorted(rows)
    assert rows["nf4+lora4-MOEQUANT_DECODE_MMA_STAGES=2"]["env"] == {"MOEQUANT_DECODE_MMA_STAGES": "2"}
    assert rows["nf4"]["env"] == {} and rows["nf4-MOEQUANT_DECODE_MMA_STAGES=2"]["moequant_us"] > 0
    bad = _run(["benchmarks/bench_decode_graph.py", "--device", "cpu", "--env-row", "NOVALUE"])
    assert bad.returncode == 2 and "--env-row expects NAME=VALUE" in bad.stderr

    bench_decode_graph = pytest.importorskip("bench_decode_graph")
    monkeypatch.delenv("MOEQUANT_X_UNSET", raising=False)
    monkeypatch.setenv("MOEQUANT_X_SET", "old")
    with bench_decode_graph.env_vars({"MOEQUANT_X_UNSET": "1", "MOEQUANT_X_SET": "new"}):
        assert os.environ["MOEQUANT_X_UNSET"] == "1" and os.environ["MOEQUANT_X_SET"] == "new"
    assert "MOEQUANT_X_UNSET" not in os.environ and os.environ["MOEQUANT_X_SET"] == "old"


def test_decode_graph_chained_smoke_run(tmp_path):
    out = tmp_path / "decode_graph.json"
    r = _run(["benchmarks/bench_decode_graph.py", "--device", "cpu", "--shapes", "tiny", "--tokens", "1",
              "--formats", "nf4", "--lora-rank", "0", "--reps", "1", "--calls", "2", "--chain", "--out", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    record = json.loads(out.read_text())
    assert "--chain" in record["timing"] and record["rows"]
    assert all(row["chained"] and row["moequant_us"] > 0 and row["bf16_us"] > 0 for row in record["rows"])


def test_profile_trace_gaps():
    profile_experts = pytest.importorskip("profile_experts")
    events = [
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 0.0, "dur": 10.0},
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 5.0, "dur": 20.0},  # overlaps a: busy until 25
        {"ph": "X", "cat": "gpu_memcpy", "name": "copy", "ts": 27.0, "dur": 1.0},  # 2 us after: not a gap
        {"ph": "X", "cat": "kernel", "name": "c", "ts": 128.0, "dur": 2.0},  # 100 us idle
        {"ph": "X", "cat": "kernel", "name": "d", "ts": 140.0, "dur": 5.0},  # 10 us idle
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 20.0, "dur": 90.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 120.0, "dur": 2.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 30.0, "dur": 50.0},
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 60.0},
    ]
    busy_ms, gaps = profile_experts.trace_gaps(events)
    assert busy_ms == pytest.approx(38e-3)
    assert [(us, before, after) for us, before, after, _ in gaps] == [(100.0, "copy", "c"), (10.0, "c", "d")]
    assert gaps[0][3] == ["cudaStreamSynchronize"] and gaps[1][3] == []
