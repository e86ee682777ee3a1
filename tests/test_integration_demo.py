"""The README's demo runs end to end (shortened)."""

import os
import subprocess
import sys

import pytest

pytest.importorskip("peft")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--steps", "4", "--layers", "1",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "experts, moequant NF4" in out and "experts implementation: 'moequant'" in out
    assert "max |logit difference| = 0" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
