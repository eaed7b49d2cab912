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
from qkernels import reference as ref
from qkernels import triton_kernels as tk

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
    for fuse in (True, False):
        got = tk.affine3_matmul(x, *[t.to(dev) for t in (mt.base.packed, mt.base.scale, mt.base.zero)], k, group,
                                u, v, fuse_compensator=fuse)
        assert torch.allclose(got.cpu(), x.cpu() @ mt.dequantize().T, rtol=2e-3, atol=2e-3), ("milo", fuse)
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


def test_quant_linear_reference_matches_dequantized_weight():
    from qkernels.modules import QuantLinear
    from quant.milo import quantize_milo

    torch.manual_seed(0)
    w = torch.randn(48, 128) * 0.05
    mt = quantize_milo(w, rank=4, rounds=2)
    layer = QuantLinear(128, 48, packed=mt.base.packed, scale=mt.base.scale, zero=mt.base.zero, bits=3, group=64,
                        u=mt.u.dequantize(), v=mt.v.dequantize(), backend="reference")
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ mt.dequantize().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        QuantLinear(128, 48, packed=mt.base.packed, scale=mt.base.scale, zero=mt.base.zero, backend="cuda")(x)


def test_quant_linear_triton_path_in_the_interpreter():
    code = r'''
import torch, warnings
from qkernels.modules import QuantLinear
from quant.base import quantize_rtn
torch.manual_seed(0)
w = torch.randn(40, 96) * 0.05
q = quantize_rtn(w, 3, 32)
layer = QuantLinear(96, 40, packed=q.packed, scale=q.scale, zero=q.zero, bits=3, group=32, backend="triton")
x = torch.randn(2, 96)
assert torch.allclose(layer(x), x @ q.dequantize().T, rtol=2e-3, atol=2e-3)
q4 = quantize_rtn(w, 4, 32)
layer4 = QuantLinear(96, 40, packed=q4.packed, scale=q4.scale, zero=q4.zero, bits=4, group=32, backend="triton")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = layer4(x); layer4(x)
assert torch.allclose(y, x @ q4.dequantize().T, rtol=1e-4, atol=1e-4)  # fell back to the reference
assert len([c for c in caught if "4-bit" in str(c.message)]) == 1  # one warning
print("ok")
'''
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, (out.stdout + out.stderr)[-3000:]


def test_quant_experts_triton_paths_in_the_interpreter():
    """RTN experts take the grouped kernel (one launch), MiLo and codebook experts the per-expert kernels."""
    code = r'''
import torch
from qkernels.modules import QuantExperts
from quant.base import quantize_rtn
from quant.checkpoint import stack_experts
from quant.codebook import quantize_codebook
from quant.milo import quantize_milo
torch.manual_seed(0)
E, H, I = 3, 64, 32
act = torch.nn.functional.silu
makers = {"rtn": lambda n, k: quantize_rtn(torch.randn(n, k) * 0.05, 3, 32),
          "milo": lambda n, k: quantize_milo(torch.randn(n, k) * 0.05, rank=2, rounds=1, group_size=32),
          "codebook": lambda n, k: quantize_codebook(torch.randn(n, k) * 0.05, None)}
for name, make in makers.items():
    gu = [make(2 * I, H) for _ in range(E)]
    dn = [make(H, I) for _ in range(E)]
    x = torch.randn(5, H)
    idx = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 0], [0, 2]])  # expert 1 gets no tokens
    wt = torch.rand(5, 2)
    got = QuantExperts(stack_experts(gu, 2 * I, H), stack_experts(dn, H, I), H, I, act, "triton")(x, idx, wt)
    want = QuantExperts(stack_experts(gu, 2 * I, H), stack_experts(dn, H, I), H, I, act, "reference")(x, idx, wt)
    assert torch.allclose(got, want, rtol=2e-3, atol=2e-3), name
print("ok")
'''
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, (out.stdout + out.stderr)[-3000:]
