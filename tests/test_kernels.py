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


# rank 96 runs in two RANK_BLOCK chunks (the second one part-masked); odd N and K; K not a multiple of the group
RANK_CHUNKS = r"""
import torch
from quant.milo import quantize_milo
from qkernels import triton_kernels as tk

dev = "{device}"
assert tk.rank_block(96) == tk.MAX_RANK_BLOCK and tk.rank_block(3) == 16 and tk.rank_block(0) == 0
assert [tk.m_bucket(m) for m in (1, 3, 16, 17, 100, 5000)] == [1, 4, 16, 32, 128, 128]
for tuned in (tk._affine3_tuned, tk._grouped_affine3_tuned):  # a config tuned at rank 8 is not reused at 512
    assert {"M_BUCKET", "RANK_BLOCK"} <= set(tuned.keys) and "M" not in tuned.keys, tuned.keys
torch.manual_seed(0)
for (m, n, k, group) in [(3, 100, 200, 64), (17, 130, 96, 32)]:
    mt = quantize_milo(torch.randn(n, k) * 0.05, rank=96, rounds=1, group_size=group, pad=True)
    b = mt.base
    x = torch.randn(m, k, device=dev)
    got = tk.affine3_matmul(x, b.packed.to(dev), b.scale.to(dev), b.zero.to(dev), k, group,
                            mt.u.dequantize().to(dev), mt.v.dequantize().to(dev))
    want = x.cpu() @ mt.dequantize().T
    assert torch.allclose(got.cpu(), want, rtol=2e-3, atol=2e-3 * want.abs().max()), (m, n, k)
print("kernels ok")
"""

# MiLo experts in the one-launch grouped kernel: per-expert ranks zero-padded to one (expert 3 has none), empty
# experts (1 and 4), odd N and K, a partial last group, and a rank above one RANK_BLOCK chunk
GROUPED_COMPENSATOR = r"""
import torch
from quant.milo import quantize_milo
from qkernels import reference as ref
from qkernels import triton_kernels as tk

dev = "{device}"
torch.manual_seed(0)
for (n, k, group, ranks) in [(70, 200, 64, [4, 2, 3, 0, 1]), (90, 96, 32, [80, 5, 1, 0, 2])]:
    ms = [quantize_milo(torch.randn(n, k) * 0.05, rank=r, rounds=1, group_size=group, pad=True) for r in ranks]
    packed, scale, zero = (torch.stack([getattr(m.base, a) for m in ms]) for a in ("packed", "scale", "zero"))
    u, v = torch.zeros(len(ms), n, max(ranks)), torch.zeros(len(ms), max(ranks), k)
    for e, (m, r) in enumerate(zip(ms, ranks)):
        if r:
            u[e, :, :r], v[e, :r] = m.u.dequantize(), m.v.dequantize()
    counts = [3, 0, 21, 2, 0]
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    x = torch.randn(sum(counts), k)
    got = tk.grouped_affine3_matmul(x.to(dev), offsets.to(dev), packed.to(dev), scale.to(dev), zero.to(dev), k,
                                    group, max(counts), u.to(dev), v.to(dev))
    want = ref.grouped_affine_matmul(x, offsets, packed, scale, zero, 3, k, group, u, v)
    assert torch.allclose(got.cpu(), want, rtol=2e-3, atol=2e-3 * want.abs().max()), (n, k)
    for e, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):  # against MiLo itself
        assert torch.allclose(want[lo:hi], x[lo:hi] @ ms[e].dequantize().T, rtol=1e-4, atol=1e-4)
print("kernels ok")
"""

# codebook experts in the one-launch grouped kernel: empty experts (1 and 4, and a block of empty experts at the
# end), odd N and K (not multiples of the 64 x 64 tiles), per-row and per-group codebooks, fp32/fp16 activations
GROUPED_CODEBOOK = r"""
import torch
from quant.codebook import quantize_codebook
from qkernels import reference as ref
from qkernels import triton_kernels as tk

dev = "{device}"
assert {"M_BUCKET", "N", "K"} <= set(tk._grouped_codebook4_tuned.keys) and "M" not in tk._grouped_codebook4_tuned.keys
torch.manual_seed(0)
for (n, k, group) in [(70, 200, None), (90, 200, 40), (33, 96, 32)]:
    cbs = [quantize_codebook(torch.randn(n, k) * 0.05, group, iters=3) for _ in range(5)]
    packed, cent = torch.stack([c.packed for c in cbs]), torch.stack([c.centroids for c in cbs])
    assert cent.shape[2] == (1 if group is None else k // group)
    counts = [3, 0, 21, 2, 0]
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(sum(counts), k, dtype=dtype)
        got = tk.grouped_codebook4_matmul(x.to(dev), offsets.to(dev), packed.to(dev), cent.to(dev), k, max(counts))
        assert got.dtype == dtype and got.shape == (sum(counts), n)
        want = ref.grouped_codebook_matmul(x.float(), offsets, packed, cent, k)
        tol = 2e-3 if dtype == torch.float32 else 3e-2
        assert torch.allclose(got.float().cpu(), want, rtol=tol, atol=tol * want.abs().max()), (n, k, group, dtype)
        for e, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):  # against CodeQuant itself
            assert torch.allclose(want[lo:hi], x[lo:hi].float() @ cbs[e].dequantize().T, rtol=1e-4, atol=1e-4)
print("kernels ok")
"""

# QuantLinear and QuantExperts on the Triton backend against their torch reference, every format; on CPU in the
# interpreter, on CUDA as the `gpu` test
MODULES = r"""
import torch
from qkernels.modules import QuantExperts, QuantLinear
from quant.base import quantize_rtn
from quant.checkpoint import stack_experts
from quant.codebook import quantize_codebook
from quant.milo import quantize_milo

dev = "{device}"
torch.manual_seed(0)
makers = {"rtn": lambda n, k: quantize_rtn(torch.randn(n, k) * 0.05, 3, 32),
          "milo": lambda n, k: quantize_milo(torch.randn(n, k) * 0.05, rank=3, rounds=1, group_size=32),
          "codebook": lambda n, k: quantize_codebook(torch.randn(n, k) * 0.05, None)}


def linear(q, n, k, backend):
    if hasattr(q, "centroids"):
        return QuantLinear(k, n, packed=q.packed, centroids=q.centroids, bits=4, group=k, backend=backend)
    b = getattr(q, "base", q)
    uv = {"u": q.u.dequantize(), "v": q.v.dequantize()} if hasattr(q, "u") else {}
    return QuantLinear(k, n, packed=b.packed, scale=b.scale, zero=b.zero, bits=3, group=32, backend=backend, **uv)


E, H, I = 4, 64, 96
act = torch.nn.functional.silu
with torch.no_grad():
    for name, make in makers.items():
        q = make(40, H)
        x = torch.randn(3, 5, H, device=dev)
        got = linear(q, 40, H, "triton").to(dev)(x)
        want = linear(q, 40, H, "reference")(x.cpu())
        assert got.device.type == dev and torch.allclose(got.cpu(), want, rtol=2e-3, atol=2e-3), ("linear", name)
        gu, dn = [make(2 * I, H) for _ in range(E)], [make(H, I) for _ in range(E)]
        experts = {b: QuantExperts(stack_experts(gu, 2 * I, H), stack_experts(dn, H, I), H, I, act, b)
                   for b in ("triton", "reference")}
        for T in (1, 7, 40):
            x = torch.randn(T, H)
            idx = torch.stack([torch.randperm(E - 1)[:2] for _ in range(T)])  # expert E-1 gets no tokens
            wt = torch.rand(T, 2)
            got = experts["triton"].to(dev)(x.to(dev), idx.to(dev), wt.to(dev))
            want = experts["reference"](x, idx, wt)
            assert torch.allclose(got.cpu(), want, rtol=2e-3, atol=2e-3), ("experts", name, T)
print("kernels ok")
"""

# Mixtral's N = 28672 with more than 2^31 / N rows: y's row offsets pass 2^31 (8.6 GB of fp32 output)
INT64_OFFSETS = r"""
import torch
from quant.base import quantize_rtn
from qkernels import reference as ref
from qkernels import triton_kernels as tk

torch.manual_seed(0)
n, k, group = 28672, 64, 64
q = quantize_rtn(torch.randn(n, k) * 0.05, 3, group)
rows = 2**31 // n + 100
x = torch.randn(rows, k, device="cuda")
tail = slice(rows - 40, rows)  # rows whose y offsets overflow int32
want = ref.affine_matmul(x[tail].cpu(), q.packed, q.scale, q.zero, 3, k, group)
packed, scale, zero = (t.cuda() for t in (q.packed, q.scale, q.zero))
with torch.no_grad():
    y = tk.affine3_matmul(x, packed, scale, zero, k, group)
    assert torch.allclose(y[tail].cpu(), want, rtol=2e-3, atol=2e-3), "dense"
    del y
    offsets = torch.tensor([0, 7, rows], device="cuda")
    y = tk.grouped_affine3_matmul(x, offsets, packed[None].expand(2, -1, -1).contiguous(),
                                  scale[None].expand(2, -1, -1).contiguous(),
                                  zero[None].expand(2, -1, -1).contiguous(), k, group, rows - 7)
    assert torch.allclose(y[tail].cpu(), want, rtol=2e-3, atol=2e-3), "grouped"
print("kernels ok")
"""

SCRIPTS = {"kernels": CHECKS, "rank_chunks": RANK_CHUNKS, "grouped_compensator": GROUPED_COMPENSATOR,
           "grouped_codebook": GROUPED_CODEBOOK, "modules": MODULES}


def _run(device: str, env_extra: dict, code: str = CHECKS) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-c", code.replace("{device}", device)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _interpreted(code: str) -> None:
    out = _run("cpu", {"TRITON_INTERPRET": "1"}, code)
    assert out.returncode == 0 and "kernels ok" in out.stdout, (out.stdout + out.stderr)[-4000:]


def test_triton_kernels_match_references_in_the_interpreter():
    _interpreted(CHECKS)


def test_compensator_rank_runs_in_chunks_and_the_tune_key_buckets_m():
    _interpreted(RANK_CHUNKS)


def test_grouped_kernel_fuses_per_expert_compensators():
    _interpreted(GROUPED_COMPENSATOR)


def test_grouped_codebook_kernel_matches_the_reference():
    _interpreted(GROUPED_CODEBOOK)


def test_quant_modules_on_the_triton_backend_match_the_reference_in_the_interpreter():
    _interpreted(MODULES)


# TF32: on CUDA tl.dot of fp32 inputs runs in TF32 (10-bit mantissa), so the scripts' tolerances (2e-3 relative
# for fp32 activations) cover TF32 rounding over K <= 576, not only fp32 summation order.
@pytest.mark.gpu
@pytest.mark.parametrize("script", [*SCRIPTS, "int64_offsets"])
def test_triton_kernels_match_references_on_cuda(script):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    out = _run("cuda", {"TRITON_INTERPRET": "0"}, {**SCRIPTS, "int64_offsets": INT64_OFFSETS}[script])
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
    """RTN, MiLo and codebook experts take their grouped kernel: one launch per projection, whatever the number
    of experts (none per expert)."""
    code = r"""
import torch
from qkernels import triton_kernels as tk
from qkernels.modules import QuantExperts
from quant.base import quantize_rtn
from quant.checkpoint import stack_experts
from quant.codebook import quantize_codebook
from quant.milo import quantize_milo
calls = []
for fn in ("grouped_affine3_matmul", "affine3_matmul", "codebook4_matmul", "grouped_codebook4_matmul"):
    setattr(tk, fn, (lambda f, name: lambda *a, **kw: calls.append(name) or f(*a, **kw))(getattr(tk, fn), fn))
torch.manual_seed(0)
E, H, I = 3, 64, 32
act = torch.nn.functional.silu
makers = {"rtn": lambda n, k: quantize_rtn(torch.randn(n, k) * 0.05, 3, 32),
          "milo": lambda n, k: quantize_milo(torch.randn(n, k) * 0.05, rank=2, rounds=1, group_size=32),
          "codebook": lambda n, k: quantize_codebook(torch.randn(n, k) * 0.05, None),
          "codebook_g32": lambda n, k: quantize_codebook(torch.randn(n, k) * 0.05, 32)}
launches = {"rtn": ["grouped_affine3_matmul"] * 2, "milo": ["grouped_affine3_matmul"] * 2,
            "codebook": ["grouped_codebook4_matmul"] * 2, "codebook_g32": ["grouped_codebook4_matmul"] * 2}
for name, make in makers.items():
    gu = [make(2 * I, H) for _ in range(E)]
    dn = [make(H, I) for _ in range(E)]
    x = torch.randn(5, H)
    idx = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 0], [0, 2]])  # expert 1 gets no tokens
    wt = torch.rand(5, 2)
    calls.clear()
    got = QuantExperts(stack_experts(gu, 2 * I, H), stack_experts(dn, H, I), H, I, act, "triton")(x, idx, wt)
    assert calls == launches[name], (name, calls)
    want = QuantExperts(stack_experts(gu, 2 * I, H), stack_experts(dn, H, I), H, I, act, "reference")(x, idx, wt)
    assert torch.allclose(got, want, rtol=2e-3, atol=2e-3), name
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, (out.stdout + out.stderr)[-3000:]


def test_gradients_on_the_triton_backend_match_the_reference():
    """The Triton kernels have no backward: with a gradient asked for, the modules run the reference (x.grad
    exact, the compensator's and the base's terms both), without one they run the kernel."""
    code = r"""
import torch
from qkernels import triton_kernels as tk
from qkernels.modules import QuantExperts, QuantLinear
from quant.checkpoint import stack_experts
from quant.milo import quantize_milo
calls = []
kernel = tk.affine3_matmul
tk.affine3_matmul = lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
torch.manual_seed(0)
mt = quantize_milo(torch.randn(40, 96) * 0.05, rank=4, rounds=1, group_size=32)
args = dict(packed=mt.base.packed, scale=mt.base.scale, zero=mt.base.zero, bits=3, group=32, u=mt.u.dequantize(),
            v=mt.v.dequantize())
layer, ref_layer = QuantLinear(96, 40, **args, backend="triton"), QuantLinear(96, 40, **args, backend="reference")
probe = torch.randn(3, 40)
x = torch.randn(3, 96, requires_grad=True)
x_ref = x.detach().clone().requires_grad_()
y = layer(x)
assert y.requires_grad and not calls
(y * probe).sum().backward()
(ref_layer(x_ref) * probe).sum().backward()
assert torch.allclose(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
assert torch.allclose(x.grad, probe @ mt.dequantize(), rtol=1e-4, atol=1e-5)
with torch.no_grad():
    layer(x)
assert len(calls) == 1  # inference still takes the kernel
try:  # called directly, a kernel refuses to give a gradient that would miss its own term
    kernel(x, *(t for t in (mt.base.packed, mt.base.scale, mt.base.zero)), 96, 32, args["u"], args["v"],
           fuse_compensator=False)
    raise AssertionError("no error")
except RuntimeError as exc:
    assert "no backward" in str(exc)

E, H, I = 3, 64, 32
gu = [quantize_milo(torch.randn(2 * I, H) * 0.05, rank=2, rounds=1, group_size=32) for _ in range(E)]
dn = [quantize_milo(torch.randn(H, I) * 0.05, rank=2, rounds=1, group_size=32) for _ in range(E)]
idx, wt = torch.tensor([[0, 2], [2, 0], [0, 2]]), torch.rand(3, 2)
grads = []
for backend in ("triton", "reference"):
    h = torch.randn(3, H, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = QuantExperts(stack_experts(gu, 2 * I, H), stack_experts(dn, H, I), H, I, torch.nn.functional.silu,
                       backend)(h, idx, wt)
    assert out.requires_grad, backend
    out.square().sum().backward()
    grads.append(h.grad)
assert torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, (out.stdout + out.stderr)[-3000:]


def test_mis_sized_buffers_are_clear_errors():
    from qkernels.modules import QuantExperts, QuantLinear
    from quant.base import quantize_rtn
    from quant.checkpoint import stack_experts
    from quant.codebook import quantize_codebook
    from quant.milo import quantize_milo

    torch.manual_seed(0)
    mt = quantize_milo(torch.randn(48, 128) * 0.05, rank=4, rounds=1, group_size=64)
    ok = {"packed": mt.base.packed, "scale": mt.base.scale, "zero": mt.base.zero, "bits": 3, "group": 64,
          "u": mt.u.dequantize(), "v": mt.v.dequantize()}
    QuantLinear(128, 48, **ok)
    bad = {"packed": mt.base.packed[:, :-3],  # one block of 32 codes short
           "scale": mt.base.scale[:, :1], "zero": mt.base.zero[:7], "v": mt.v.dequantize()[:, :96]}
    want = {"packed": r"packed has shape \[48, 9\], expected \[48, 12\]",
            "scale": r"scale has shape \[48, 1\], expected \[48, 2\]",
            "zero": r"zero has shape \[7, 2\], expected \[48, 2\]",
            "v": r"v has shape \[4, 96\], expected \[4, 128\]"}
    for name, t in bad.items():
        with pytest.raises(ValueError, match=want[name]):
            QuantLinear(128, 48, **{**ok, name: t})
    with pytest.raises(ValueError, match="both u and v"):
        QuantLinear(128, 48, **{**ok, "v": None})
    cb = quantize_codebook(torch.randn(48, 128) * 0.05, 32)
    with pytest.raises(ValueError, match=r"packed has shape \[48, 12\], expected \[48, 16\]"):
        QuantLinear(128, 48, packed=cb.packed[:, :-4], centroids=cb.centroids, bits=4, group=32)
    with pytest.raises(ValueError, match=r"centroids has shape \[48, 4, 15\], expected \[48, 4, 16\]"):
        QuantLinear(128, 48, packed=cb.packed, centroids=cb.centroids[..., :15], bits=4, group=32)
    # experts: the down projection's stack holds one expert fewer than gate_up's
    gu = stack_experts([quantize_rtn(torch.randn(64, 32), 3, 32) for _ in range(3)], 64, 32)
    dn = stack_experts([quantize_rtn(torch.randn(32, 32), 3, 32) for _ in range(2)], 32, 32)
    with pytest.raises(ValueError, match=r"packed has shape \[2, 32, 3\], expected \[3, 32, 3\]"):
        QuantExperts(gu, dn, 32, 32, torch.nn.functional.silu)
    layer = QuantLinear(128, 48, **ok, backend="reference")
    # an x of 4 x 64 would otherwise pass as 2 x 128 through reshape(-1, 128)
    for x, shape in ((torch.randn(4, 64), "4, 64"), (torch.randn(2, 3, 256), "2, 3, 256")):
        with pytest.raises(ValueError, match=rf"x has shape \[{shape}\], expected \[\.\.\., 128\]"):
            layer(x)


def test_triton_wrappers_check_their_inputs_in_the_interpreter():
    code = r"""
import torch
from qkernels import triton_kernels as tk
from quant.base import quantize_rtn
from quant.codebook import quantize_codebook
q = quantize_rtn(torch.randn(48, 128), 3, 64)
cb = quantize_codebook(torch.randn(48, 128), None)
off = torch.tensor([0, 4])
cases = {"x has shape [4, 64], expected [..., 128]": lambda: tk.affine3_matmul(torch.randn(4, 64), q.packed,
                                                                                q.scale, q.zero, 128, 64),
         "x has shape [2, 96]": lambda: tk.codebook4_matmul(torch.randn(2, 96), cb.packed, cb.centroids, 128),
         "packed has shape [1, 48, 9], expected [1, 48, 12]": lambda: tk.grouped_affine3_matmul(
             torch.randn(4, 128), off, q.packed[None, :, :-3], q.scale[None], q.zero[None], 128, 64, 4),
         "expert_offsets has shape [3], expected [2]": lambda: tk.grouped_affine3_matmul(
             torch.randn(4, 128), torch.tensor([0, 2, 4]), q.packed[None], q.scale[None], q.zero[None], 128, 64, 2),
         "centroids has shape [1, 40, 1, 16], expected [1, 48, 1, 16]": lambda: tk.grouped_codebook4_matmul(
             torch.randn(4, 128), off, cb.packed[None], cb.centroids[None, :40], 128, 4),
         "expert_offsets has shape [4], expected [2]": lambda: tk.grouped_codebook4_matmul(
             torch.randn(4, 128), torch.tensor([0, 1, 2, 4]), cb.packed[None], cb.centroids[None], 128, 2),
         # a grid of fewer rows than an expert has would leave its other rows zero
         "max_rows_per_expert=3 is below the 4 rows": lambda: tk.grouped_codebook4_matmul(
             torch.randn(4, 128), off, cb.packed[None], cb.centroids[None], 128, 3),
         "max_rows_per_expert=2 is below the 4 rows": lambda: tk.grouped_affine3_matmul(
             torch.randn(4, 128), off, q.packed[None], q.scale[None], q.zero[None], 128, 64, 2),
         "must rise from 0 to the 5 rows": lambda: tk.grouped_affine3_matmul(
             torch.randn(5, 128), off, q.packed[None], q.scale[None], q.zero[None], 128, 64)}
# left out, the grid's rows come from the offsets
y = tk.grouped_codebook4_matmul(torch.ones(4, 128), off, cb.packed[None], cb.centroids[None], 128)
assert torch.allclose(y, tk.codebook4_matmul(torch.ones(4, 128), cb.packed, cb.centroids, 128))
for message, call in cases.items():
    try:
        call()
        raise AssertionError(f"no error: {message}")
    except ValueError as exc:
        assert message in str(exc), (message, str(exc))
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "ok" in out.stdout, (out.stdout + out.stderr)[-3000:]


def test_devices_without_a_kernel_take_the_reference_with_one_warning():
    import warnings

    from qkernels import reference as ref
    from qkernels.modules import pick_backend
    from quant.base import quantize_rtn

    x = torch.empty(2, 128, device="meta")  # stands for mps / xpu: neither CUDA nor CPU
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [pick_backend(b, x, 3) for b in ("auto", "auto", "cpu", "triton", "reference")] == ["reference"] * 5
    messages = [str(c.message) for c in caught]
    assert len(messages) == 3 and all("meta" in m for m in messages), messages  # one per backend asked for
    q = quantize_rtn(torch.randn(48, 128), 3, 64)
    stacked = [t[None].expand(2, *t.shape).to("meta") for t in (q.packed, q.scale, q.zero)]
    out = ref.grouped_affine_matmul(torch.empty(5, 128, device="meta"), torch.tensor([0, 2, 5]), *stacked, 3, 128, 64)
    assert out.device.type == "meta" and out.shape == (5, 48)
