"""Where benchmark runs record their JSON, and what every record says about the run that made it.

Each benchmark writes one JSON file under benchmarks/results/, named after the script and the
device, headed by the same fields (device, versions, the command that reproduces it), so that
results of different scripts and sessions can be compared and traced back to their command.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import sys

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpuinfo_field(name: str) -> str | None:
    """The first value of `name` in /proc/cpuinfo (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def device_name(device: torch.device | str | None = None) -> str:
    """The CUDA device's name, or the host processor's model (or "cpu") for a CPU run."""
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    if on_cuda:
        return torch.cuda.get_device_name(device)
    return cpuinfo_field("model name") or platform.processor() or "cpu"


def default_results_path(stem: str, device: str) -> str:
    """benchmarks/results/<stem>-<device name as an identifier>.json."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")
    return os.path.join(RESULTS_DIR, f"{stem}-{slug}.json")


def run_metadata(device: str, packages: tuple[str, ...] = ()) -> dict:
    """The fields every record starts with: device, torch (and its CUDA), the versions of
    `packages` as installed, Python, the command line that reproduces the run, and the MOEQUANT_*
    environment variables it ran with (they switch kernel paths)."""
    meta = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in packages:
        try:
            meta[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            meta[name] = None
    meta["python"] = platform.python_version()
    meta["command"] = " ".join(["python"] + sys.argv)
    meta["environment"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MOEQUANT_")}
    return meta


def write_results(path: str, data) -> str:
    """Writes `data` as indented JSON to `path`, creating its folder; returns the path. Scripts
    call it after each shape too, so that a run cut short keeps what it measured."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    return path
