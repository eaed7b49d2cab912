"""Triton kernels against the torch references: on CPU through the interpreter (TRITON_INTERPRET=1, set in a
subprocess so the rest of the suite is unaffected); on CUDA, marked `gpu`."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

CHECKS = r'''
import torch
from quant.base import quantize_rtn
from quant.codebook import quantize_codebook
from quant.milo import quantize_milo
from kernels import reference as ref
from kernels import triton_kernels as tk

dev = "{device}"
torch.manual_seed(0)
for (m, n, k, group) in [(1, 40, 96, 32), (5, 70, 128, 64), (16, 33, 200, 64), (3, 64, 576, 128)]:
    w = torch.randn(n, k) * 0.05
    qt = quantize_rtn(w, 3, group, pad=True)
    args = [t.to(dev) for t in (qt.packed, qt.scale, qt.zero)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(m, k, dtype=dtype, device=dev)
        got = tk.affine3_matmul(x, *args, k, group).float()
        want = ref.affine_matmul(x.float().cpu(), qt.packed, qt.scale, qt.zero, 3, k, group).float()
        tol = 2e-3 if dtype == torch.float32 else 3e-2
        assert torch.allclose(got.cpu(), want, rtol=tol, atol=tol * want.abs().max()), (m, n, k, dtype)
    mt = quantize_milo(w, rank=4, rounds=2, group_size=group, pad=True)
    u, v = mt.u.dequantize().to(dev), mt.v.dequantize().to(dev)
    x = torch.randn(m, k, device=dev)
    got = tk.affine3_matmul(x, *[t.to(dev) for t in (mt.base.packed, mt.base.scale, mt.base.zero)], k, group, u, v)
    assert torch.allclose(got.cpu(), x.cpu() @ mt.dequantize().T, rtol=2e-3, atol=2e-3), "milo"
    if k % 32 == 0:
        cb = quantize_codebook(w, None if k % 64 else 64)
        x = torch.randn(m, k, device=dev)
        got = tk.codebook4_matmul(x, cb.packed.to(dev), cb.centroids.to(dev), k)
        want = ref.codebook_matmul(x.cpu(), cb.packed, cb.centroids, k)
        assert torch.allclose(got.cpu(), want, rtol=2e-3, atol=2e-3), ("codebook", m, n, k)

# MoE grouped: 4 experts, one of them empty
e, n, k, group = 4, 48, 128, 64
ws = [torch.randn(n, k) * 0.05 for _ in range(e)]
qs = [quantize_rtn(w, 3, group) for w in ws]
packed = torch.stack([q.packed for q in qs]); scale = torch.stack([q.scale for q in qs]); zero = torch.stack([q.zero for q in qs])
counts = [3, 0, 17, 1]
offsets = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)))
x = torch.randn(sum(counts), k)
got = tk.grouped_affine3_matmul(x.to(dev), offsets.to(dev), packed.to(dev), scale.to(dev), zero.to(dev), k, group, max(counts))
want = ref.grouped_affine_matmul(x, offsets, packed, scale, zero, 3, k, group)
assert torch.allclose(got.cpu(), want, rtol=2e-3, atol=2e-3), "grouped"
print("kernels ok")
'''


def _run(device: str, env_extra: dict) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", CHECKS.replace("{device}", device)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_triton_kernels_match_references_in_the_interpreter():
    out = _run("cpu", {"TRITON_INTERPRET": "1"})
    assert out.returncode == 0 and "kernels ok" in out.stdout, (out.stdout + out.stderr)[-4000:]


@pytest.mark.gpu
def test_triton_kernels_match_references_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = _run("cuda", {})
    assert out.returncode == 0 and "kernels ok" in out.stdout, (out.stdout + out.stderr)[-4000:]
