"""What the benchmark suites share: the device's name, CUDA sync, the prompts they time, stage banners, and the
median-of-runs record a headline ratio needs."""

from __future__ import annotations

import platform
import statistics
import time

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (figures name the machine they were taken on)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def gsm_prompts(tok, n: int) -> list[list[int]]:
    """Chat-templated prompts of n GSM-style problems (reasoning-gym gsm_symbolic, seed 1234): the timed inputs."""
    import reasoning_gym

    data = reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=1234)
    out = []
    for row in data:
        msgs = [{"role": "system", "content": "Solve the problem step by step. Separate steps with a blank line."},
                {"role": "user", "content": row["question"]}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def stage(suite: str, name: str) -> float:
    """Print a stage banner; returns the start time."""
    print(f"\n=== bench {suite}: {name} ({time.strftime('%H:%M:%S')})", flush=True)
    return time.perf_counter()


def median_of(runs: list[float]) -> dict:
    """A headline figure measured several times: the median and every run's value."""
    return {"median": statistics.median(runs), "runs": list(runs)}


def machine() -> dict:
    """The machine a figure was taken on: CPU model and its vector extensions, cores, torch threads, GPU."""
    flags: set[str] = set()
    # cpu family and model number: a VM's "AMD EPYC" is Zen 1/2 at family 23, Zen 3/4 at 25
    id_keys = {"cpu family": "cpu_family", "model": "cpu_model_number"}
    ids: dict[str, int] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "flags":
                    flags = set(value.split())
                    break
                if key in id_keys and value.strip().isdigit():
                    ids[id_keys[key]] = int(value)
    except OSError:
        pass
    import os

    return {"cpu": cpu_model(), **ids,
            "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx"))),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
