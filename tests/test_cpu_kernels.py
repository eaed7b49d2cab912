"""The CPU kernels (C++ extension built at first use) against the torch references, the dispatch in the quantized
modules, and the packed runtime of a quantized MoE checkpoint (fused experts served by QuantExperts)."""

import warnings

import pytest
import torch

from qkernels import cpu
from qkernels import reference as ref
from qkernels.modules import QuantExperts, QuantLinear
from quant.base import quantize_rtn
from quant.checkpoint import stack_experts
from quant.codebook import quantize_codebook
from quant.milo import quantize_milo

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels could not be built here")


def _stack(*ts):
    return [t[None].contiguous() for t in ts]


def _x_seen(x, group):
    """x as the active path multiplies a 3-bit weight's groups (the integer paths round it to int16 per group)."""
    return ref.x_as_int16(x, group) if cpu.integer_path() else x


def _codebook_want(x, cb, k):
    """The codebook reference on the values the active path multiplies (integer paths: int16 x and tables, groups of a
    multiple of 32)."""
    group = k // cb.centroids.shape[-2]
    if cpu.integer_path() and group % 32 == 0:
        xs = ref.x_as_int16(x, ref.codebook_x_block(group), ref.X16_CODEBOOK_LIMIT)
        return ref.codebook_matmul(xs, cb.packed, ref.codebook_as_int16(cb.centroids), k)
    return ref.codebook_matmul(x, cb.packed, cb.centroids, k)


# The quantized modules against exact x: the integer paths' int16 activations are off by up to 1.5e-5 of a group's
# largest |x| per value (the kernels' own tests compare on the rounded values, to float rounding)
MODULE_TOL = {"rtol": 1e-5, "atol": 1e-4}


@pytest.mark.parametrize("m,n,k,group", [(1, 40, 96, 32), (5, 70, 128, 64), (16, 33, 200, 64), (3, 64, 576, 128),
                                         (9, 17, 4096, 64)])
def test_affine3_and_dequant_match_the_reference(m, n, k, group):
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.05
    q = quantize_rtn(w, 3, group, pad=True)
    x = torch.randn(m, k)
    got = cpu.affine3_grouped(x, cpu.dense_offsets(m), *_stack(q.packed, q.scale, q.zero), group)
    want = ref.affine_matmul(_x_seen(x, group), q.packed, q.scale, q.zero, 3, k, group)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.equal(cpu.affine3_dequant(q.packed, q.scale, q.zero, k, group),
                       ref.dequant_affine(q.packed, q.scale, q.zero, 3, k, group))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_milo_compensator_and_activation_dtypes(dtype):
    torch.manual_seed(1)
    w = torch.randn(50, 160) * 0.05
    mt = quantize_milo(w, rank=6, rounds=2, group_size=32, pad=True)
    u, v = mt.u.dequantize(), mt.v.dequantize()
    x = torch.randn(4, 160).to(dtype)
    got = cpu.affine3_grouped(x, cpu.dense_offsets(4), *_stack(mt.base.packed, mt.base.scale, mt.base.zero), 32,
                              u[None].contiguous(), v[None].contiguous())
    assert got.dtype == dtype
    uv = u @ v  # the compensator sees exact x, the 3-bit base what the path rounds it to
    want = _x_seen(x.float(), 32) @ (mt.dequantize() - uv).T + x.float() @ uv.T
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("group", [None, 64, 32, 8])
def test_codebook4_matches_the_reference(group):
    torch.manual_seed(2)
    w = torch.randn(37, 256) * 0.05
    cb = quantize_codebook(w, group)
    for m in (1, 7, 16):
        x = torch.randn(m, 256)
        got = cpu.codebook4_grouped(x, cpu.dense_offsets(m), *_stack(cb.packed, cb.centroids))
        want = _codebook_want(x, cb, 256)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_grouped_with_empty_experts():
    check_grouped_with_empty_experts()


def check_grouped_with_empty_experts():
    """Experts with 0, 1 and many rows in one grouped call, 3-bit and codebook, against the reference."""
    torch.manual_seed(3)
    e, n, k, group = 4, 48, 128, 64
    qs = [quantize_rtn(torch.randn(n, k) * 0.05, 3, group) for _ in range(e)]
    packed, scale, zero = (torch.stack([getattr(q, a) for q in qs]) for a in ("packed", "scale", "zero"))
    counts = [3, 0, 17, 1]
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    x = torch.randn(sum(counts), k)
    got = cpu.affine3_grouped(x, offsets, packed, scale, zero, group)
    torch.testing.assert_close(got, ref.grouped_affine_matmul(_x_seen(x, group), offsets, packed, scale, zero, 3, k,
                                                              group), rtol=1e-5, atol=1e-5)
    cbs = [quantize_codebook(torch.randn(n, k) * 0.05, None) for _ in range(e)]
    got = cpu.codebook4_grouped(x, offsets, torch.stack([c.packed for c in cbs]),
                                torch.stack([c.centroids for c in cbs]))
    for i, (lo, hi) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist())):
        torch.testing.assert_close(got[lo:hi], _codebook_want(x[lo:hi], cbs[i], k), rtol=1e-5, atol=1e-5)


def test_bad_packed_sizes_are_clear_errors():
    q = quantize_rtn(torch.randn(8, 128), 3, 64)
    x = torch.randn(1, 128)
    with pytest.raises(RuntimeError, match="words per row"):
        cpu.affine3_grouped(x, cpu.dense_offsets(1), q.packed[None, :, :-1].contiguous(),
                            *_stack(q.scale, q.zero), 64)
    with pytest.raises(RuntimeError, match="offsets"):
        cpu.affine3_grouped(x, torch.tensor([0, 2]), *_stack(q.packed, q.scale, q.zero), 64)
    with pytest.raises(RuntimeError, match="does not cover"):
        cpu.affine3_grouped(torch.randn(1, 256), cpu.dense_offsets(1), *_stack(q.packed, q.scale, q.zero), 64)


def test_quant_linear_dispatch_cpu_kernel_prefill_path_and_fallback():
    torch.manual_seed(4)
    w = torch.randn(48, 128) * 0.05
    mt = quantize_milo(w, rank=4, rounds=2)
    args = {"packed": mt.base.packed, "scale": mt.base.scale, "zero": mt.base.zero, "bits": 3, "group": 64,
            "u": mt.u.dequantize(), "v": mt.v.dequantize()}
    layer = QuantLinear(128, 48, **args)  # auto: the CPU kernel here
    ref_layer = QuantLinear(128, 48, **args, backend="reference")
    for shape in ((1, 128), (2, 3, 128), (40, 128)):  # decode sizes use the kernel, 40 rows dequantize + matmul
        x = torch.randn(*shape)
        torch.testing.assert_close(layer(x), x @ mt.dequantize().T, **MODULE_TOL)
        torch.testing.assert_close(layer(x), ref_layer(x), **MODULE_TOL)
    x = torch.randn(2, 128, requires_grad=True)  # gradients flow (through the reference: the kernel has none)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, mt.dequantize().sum(0).expand(2, -1), rtol=1e-4, atol=1e-4)
    # float16 metadata survives model.to(dtype)
    assert layer.to(torch.float64).scale.dtype == torch.float16
    q4 = quantize_rtn(w, 4, 32)
    layer4 = QuantLinear(128, 48, packed=q4.packed, scale=q4.scale, zero=q4.zero, bits=4, group=32, backend="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x = torch.randn(2, 128)
        y = layer4(x)
        layer4(x)
    torch.testing.assert_close(y, x @ q4.dequantize().T, rtol=1e-5, atol=1e-5)
    assert len([c for c in caught if "4-bit" in str(c.message)]) == 1


def _loop_experts(gu, dn, x, idx, wt, act):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e >= len(gu):  # an expert not held here
                continue
            g, u = (x[t] @ gu[e].dequantize().T).chunk(2)
            out[t] += wt[t, j] * ((act(g) * u) @ dn[e].dequantize().T)
    return out


@pytest.mark.parametrize("fmt", ["milo", "codebook"])
def test_quant_experts_match_a_loop_over_experts(fmt):
    torch.manual_seed(5)
    E, H, I = 4, 64, 96
    act = torch.nn.functional.silu
    if fmt == "milo":  # ranks differ per expert (one has none): zero-padded compensators
        gu = [quantize_milo(torch.randn(2 * I, H) * 0.05, rank=4, rounds=1, group_size=64) for _ in range(E)]
        dn = [quantize_milo(torch.randn(H, I) * 0.05, rank=e % 3, rounds=1, group_size=32) for e in range(E)]
    else:
        gu = [quantize_codebook(torch.randn(2 * I, H) * 0.05, None) for _ in range(E)]
        dn = [quantize_codebook(torch.randn(H, I) * 0.05, 32) for _ in range(E)]
    for backend in ("auto", "reference"):
        experts = QuantExperts(stack_experts(gu, 2 * I, H), stack_experts(dn, H, I), H, I, act, backend)
        for T in (1, 5, 60):  # 60 tokens x top-2 of 4: > 16 rows per expert takes the prefill path
            x = torch.randn(T, H)
            idx = torch.stack([torch.randperm(E)[:2] for _ in range(T)])
            idx[0, 1] = E  # a sentinel index (expert held elsewhere) is skipped, as transformers does
            wt = torch.rand(T, 2)
            torch.testing.assert_close(experts(x, idx, wt), _loop_experts(gu, dn, x, idx, wt, act), **MODULE_TOL)


def test_packed_runtime_serves_fused_experts(tmp_path):
    import transformers

    from quant.apply import QuantSpec, fake_quantize, plan, quantize_tensor
    from quant.checkpoint import fingerprint, load_quantized, save

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    spec = QuantSpec("milo", 3, 32, rank_dense=4, rank_expert=2, rounds=2)
    results = {t.name: quantize_tensor(t.get(), spec, r) for t, r in plan(model, spec)}
    source = fingerprint(model)
    fake_quantize(model, spec)
    out = save(tmp_path / "ckpt", model, None, results, {"method": "milo", "source_fingerprint": source})
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])
    want = model(ids).logits
    for backend in ("auto", "reference"):
        packed = load_quantized(out, runtime="packed", backend=backend)
        assert type(packed.model.layers[0].mlp.experts).__name__ == "QuantExperts"
        assert not any("gate_up_proj" in n for n, _ in packed.named_parameters())  # fp expert weights are gone
        torch.testing.assert_close(packed(ids).logits, want, rtol=1e-4, atol=1e-4)
        with torch.no_grad():  # decode: one token at a time through the kernel path
            torch.testing.assert_close(packed(ids[:, :1]).logits, model(ids[:, :1]).logits, rtol=1e-4, atol=1e-4)


def test_layouts_the_cpu_kernel_does_not_take_fall_back_with_one_warning():
    torch.manual_seed(6)
    w = torch.randn(24, 96) * 0.05
    q = quantize_rtn(w, 3, 48)  # 3-bit groups of 48: not whole 32-code blocks
    layer = QuantLinear(96, 24, packed=q.packed, scale=q.scale, zero=q.zero, bits=3, group=48)
    cb = quantize_codebook(w, 12)  # codebook groups of 12
    layer_cb = QuantLinear(96, 24, packed=cb.packed, centroids=cb.centroids, bits=4, group=12)
    x = torch.randn(2, 96)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.testing.assert_close(layer(x), x @ q.dequantize().T, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer_cb(x), x @ cb.dequantize().T, rtol=1e-5, atol=1e-5)
    messages = [str(c.message) for c in caught if "CPU kernel does not take" in str(c.message)]
    assert len(messages) == 2 and "48" in messages[0]


@pytest.fixture
def isa_paths():
    """Every code path this CPU runs (scalar, avx2, avx512 as it has them), switched in-process; native after."""
    yield cpu.load().supported_isas()
    cpu.use_isa("native")


# K not a multiple of the group (padded groups), odd N (tiles of 1-4 weight rows), 1-16 x rows (tiles of 1-4 x
# rows), rank-1 and rank-64 compensators, and the tensor's last row (read with a spare byte on the AVX2 path)
AFFINE_CASES = [(1, 40, 96, 32, 0), (5, 70, 128, 64, 3), (16, 33, 200, 64, 1), (3, 67, 576, 128, 64),
                (9, 17, 4096, 64, 0), (1, 7, 64, 64, 1), (2, 21, 4096, 64, 16), (4, 9, 100, 32, 0), (13, 5, 96, 96, 2)]


def test_every_instruction_set_path_matches_the_reference(isa_paths):
    """Each path the machine supports, against the torch reference: affine 3-bit with and without MiLo's
    compensator, per-row and per-group codebooks, grouped experts with empty ones (both formats)."""
    assert "scalar" in isa_paths and cpu.load().isa() == isa_paths[-1]  # native is the best the CPU has
    for isa in isa_paths:
        assert cpu.use_isa(isa) == isa
        torch.manual_seed(0)
        for m, n, k, group, rank in AFFINE_CASES:
            w = torch.randn(n, k) * 0.05
            if rank:
                mt = quantize_milo(w, rank=rank, rounds=1, group_size=group, pad=True)
                b, u, v, want_w = mt.base, mt.u.dequantize()[None].contiguous(), mt.v.dequantize()[None].contiguous(), \
                    mt.dequantize()
            else:
                b, u, v = quantize_rtn(w, 3, group, pad=True), None, None
                want_w = ref.dequant_affine(b.packed, b.scale, b.zero, 3, k, group)
            x = torch.randn(m, k)
            got = cpu.affine3_grouped(x, cpu.dense_offsets(m), *_stack(b.packed, b.scale, b.zero), group, u, v)
            want = _x_seen(x, group) @ want_w.T
            if rank:  # the compensator sees exact x, the 3-bit base what the path rounds it to
                uv = u[0] @ v[0]
                want = _x_seen(x, group) @ (want_w - uv).T + x @ uv.T
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * want.abs().max().item(),
                                       msg=lambda text, case=(isa, m, n, k, group, rank): f"{case}: {text}")
        for group in (None, 64, 32, 8):
            for m, n in ((1, 37), (2, 4), (3, 1), (7, 6), (16, 5)):
                cb = quantize_codebook(torch.randn(n, 256) * 0.05, group)
                x = torch.randn(m, 256)
                got = cpu.codebook4_grouped(x, cpu.dense_offsets(m), *_stack(cb.packed, cb.centroids))
                want = _codebook_want(x, cb, 256)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6 * want.abs().max().item(),
                                           msg=lambda text, case=(isa, group, m, n): f"{case}: {text}")
        check_grouped_with_empty_experts()


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_the_integer_paths_are_within_their_rounding_bound_of_exact_x(isa_paths, isa):
    """Against exact x and fp16 centroids, the integer paths (AVX2, and AVX-512 with the same numerics) are off by
    no more than their roundings allow: x to int16 per block (half a step, max|x_block| / 32767 or / 16383),
    codebook tables to int16 (max|c| / 4095), plus float rounding. Values are spread over 6 orders of magnitude so
    small ones meet large ones in a block."""
    if isa not in isa_paths:
        pytest.skip(f"this CPU has no {isa}")
    cpu.use_isa(isa)
    torch.manual_seed(7)
    k, n = 512, 24
    x = torch.randn(3, k) * torch.logspace(-3, 3, k)[torch.randperm(k)]
    q = quantize_rtn(torch.randn(n, k) * 0.05, 3, 64)
    w = ref.dequant_affine(q.packed, q.scale, q.zero, 3, k, 64)
    got = cpu.affine3_grouped(x, cpu.dense_offsets(3), *_stack(q.packed, q.scale, q.zero), 64)
    step = x.abs().view(3, -1, 64).amax(-1).repeat_interleave(64, 1) / ref.X16_AFFINE_LIMIT
    bound = (step / 2) @ w.abs().T
    exact = x @ w.T
    assert ((got - exact).abs() <= bound + 1e-6 * (x.abs() @ w.abs().T)).all()
    assert (got - exact).abs().max() > 0  # it does round (the bound is not vacuous)
    cb = quantize_codebook(torch.randn(n, k) * 0.05, None)
    w, w16 = (ref.dequant_codebook(cb.packed, c, k) for c in (cb.centroids, ref.codebook_as_int16(cb.centroids)))
    got = cpu.codebook4_grouped(x, cpu.dense_offsets(3), *_stack(cb.packed, cb.centroids))
    step = x.abs().view(3, -1, 128).amax(-1).repeat_interleave(128, 1) / ref.X16_CODEBOOK_LIMIT
    bound = (step / 2) @ w16.abs().T + x.abs() @ (w - w16).abs().T
    assert ((got - x @ w.T).abs() <= bound + 1e-6 * (x.abs() @ w.abs().T)).all()
    assert ((w - w16).abs() <= cb.centroids.float().abs().amax(-1).repeat_interleave(k, 1) / 8190 * 1.001).all()
    # a NaN or inf in x is not rounded away: its rows come out NaN, as on the float paths; other rows are untouched
    bad = x.clone()
    bad[1, 5], bad[2, 300] = float("nan"), float("inf")
    for got in (cpu.affine3_grouped(bad, cpu.dense_offsets(3), *_stack(q.packed, q.scale, q.zero), 64),
                cpu.codebook4_grouped(bad, cpu.dense_offsets(3), *_stack(cb.packed, cb.centroids))):
        assert got[1:].isnan().all() and not got[0].isnan().any()
    # a NaN or inf centroid: that row comes out NaN; an all-zero table gives zeros
    c = cb.centroids.clone()
    c[3, 0, 7], c[4, 0, 0], c[5] = float("nan"), float("inf"), 0
    got = cpu.codebook4_grouped(x, cpu.dense_offsets(3), *_stack(cb.packed, c))
    assert got[:, 3:5].isnan().all() and (got[:, 5] == 0).all() and not got[:, 6:].isnan().any()


def test_the_avx512_path_gives_the_avx2_paths_results(isa_paths):
    """The AVX-512 path is the AVX2 path's integer method on wider vectors (its own 3-bit unpack, its own codebook
    lookup and x order): on one input both agree to float rounding, on every tile and group shape they take."""
    if "avx512" not in isa_paths:
        pytest.skip("this CPU has no avx512")
    torch.manual_seed(11)
    for m, n, k, group in ((1, 37, 4096, 64), (2, 13, 576, 64), (3, 9, 160, 32), (4, 6, 384, 128), (7, 5, 96, 96),
                           (16, 11, 192, 64)):
        q = quantize_rtn(torch.randn(n, k) * 0.05, 3, group, pad=True)
        x = torch.randn(m, k)
        got = {}
        for isa in ("avx2", "avx512"):
            cpu.use_isa(isa)
            got[isa] = cpu.affine3_grouped(x, cpu.dense_offsets(m), *_stack(q.packed, q.scale, q.zero), group)
        torch.testing.assert_close(got["avx512"], got["avx2"], rtol=1e-5, atol=1e-6 * got["avx2"].abs().max().item())
    for m, n, k, groups in ((1, 37, 4096, 1), (2, 13, 576, 9), (3, 9, 256, 8), (4, 6, 384, 3), (16, 5, 128, 2)):
        cb = quantize_codebook(torch.randn(n, k) * 0.05, k // groups)
        x = torch.randn(m, k)
        got = {}
        for isa in ("avx2", "avx512"):
            cpu.use_isa(isa)
            got[isa] = cpu.codebook4_grouped(x, cpu.dense_offsets(m), *_stack(cb.packed, cb.centroids))
        torch.testing.assert_close(got["avx512"], got["avx2"], rtol=1e-5, atol=1e-6 * got["avx2"].abs().max().item())


def test_dense_rows_matches_torch_on_every_path(isa_paths):
    """The engine's decode-sized dense linear: 1-9 x rows (tiles of 8, 4 and 2 weight rows and their remainders),
    K not a multiple of 8, with and without bias, on every path; shape and dtype mistakes are clear errors."""
    for isa in isa_paths:
        cpu.use_isa(isa)
        torch.manual_seed(3)
        for m, n, k in ((1, 19, 576), (2, 13, 100), (3, 7, 61), (4, 33, 256), (5, 9, 17), (8, 64, 576),
                        (9, 3, 8), (1, 1, 1)):
            w, b, x = torch.randn(n, k), torch.randn(n), torch.randn(m, k)
            for bias in (None, b):
                got = cpu.dense_rows(x, w, bias)
                want = torch.nn.functional.linear(x, w, bias)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * k ** 0.5,
                                           msg=lambda text, case=(isa, m, n, k, bias is None): f"{case}: {text}")
    with pytest.raises(RuntimeError, match="x's K"):
        cpu.dense_rows(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="float32"):
        cpu.dense_rows(torch.randn(2, 8), torch.randn(4, 8).half())


def test_a_path_the_cpu_lacks_is_a_clear_error(isa_paths):
    missing = [isa for isa in ("avx2", "avx512") if isa not in isa_paths]
    with pytest.raises(ValueError, match="unknown ISA 'sse9'"):
        cpu.use_isa("sse9")
    for isa in missing:  # on this CPU; a CPU with every path has none to refuse
        with pytest.raises(ValueError, match=f"this CPU has no {isa}"):
            cpu.use_isa(isa)
    assert cpu.use_isa("native") == isa_paths[-1]


def _attention_reference(q, k_new, v_new, kvs, layer, past, lens, scale):
    """What qkernels.cpu.decode_attention does, with torch: write the new keys and values, then SDPA per sequence
    with a causal mask over its buffer (GQA)."""
    B, T, Hq, D = q.shape
    out = torch.zeros(B, T, Hq * D)
    for b in range(B):
        kv, t, n = kvs[b][layer], lens[b], past[b] + lens[b]
        kv[0, :, past[b]:n] = k_new[b, :t].transpose(0, 1)
        kv[1, :, past[b]:n] = v_new[b, :t].transpose(0, 1)
        mask = torch.arange(n)[None, :] <= torch.arange(past[b], n)[:, None]
        o = torch.nn.functional.scaled_dot_product_attention(
            q[b:b + 1, :t].transpose(1, 2), kv[0:1, :, :n], kv[1:2, :, :n], attn_mask=mask, scale=scale,
            enable_gqa=True)
        out[b, :t] = o[0].transpose(0, 1).reshape(t, -1)
    return out


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128), (6, 3, 20)])
def test_decode_attention_matches_sdpa_on_every_path(isa_paths, heads, kv_heads, head_dim):
    """The engine's step attention: sequences with 0 to 700 cached positions (one key chunk to a head split over
    threads), 1-40 new tokens each (causal among themselves, padding rows zero; from 8 queries per KV head the AVX2
    path runs its blocked tiles: 1-4 queries by 8-16 keys, 1-2 queries by 8-32 dimensions), GQA and plain heads,
    head sizes the AVX2 path takes and one (20) it leaves to the scalar loops; the new keys and values land in their
    slots of the chosen layer and nothing else in the buffers changes; and the same with a shared prefix read from its
    own buffer (half the cached positions, all of them)."""
    layers, layer = 3, 1
    cases = [([0], [1], 1), ([421], [1], 1), ([400, 3, 700, 64], [1, 1, 1, 1], 1), ([100, 0, 257], [5, 2, 1], 5),
             ([30, 0, 300], [40, 23, 9], 40)]  # drafted steps and short prompts: the blocked path, chunk edges
    for isa in isa_paths:
        cpu.use_isa(isa)
        for past, lens, T in cases:
            torch.manual_seed(len(past) * 7 + T)
            B = len(past)
            kvs = [torch.randn(layers, 2, kv_heads, p + T + 3, head_dim) for p in past]
            want_kvs = [kv.clone() for kv in kvs]
            q = torch.randn(B, T, heads, head_dim)
            k_new, v_new = torch.randn(B, T, kv_heads, head_dim), torch.randn(B, T, kv_heads, head_dim)
            scale = head_dim ** -0.5
            got = cpu.decode_attention(q, k_new, v_new, kvs, layer, past, lens, scale)
            want = _attention_reference(q, k_new, v_new, want_kvs, layer, past, lens, scale)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6,
                                       msg=lambda text, case=(isa, past, lens): f"{case}: {text}")
            for kv, want_kv in zip(kvs, want_kvs):
                assert torch.equal(kv, want_kv)
            # the same step where each sequence shares its first positions (half of them; all of them) with a
            # prefix buffer: positions the kernel must not read are NaN in both buffers
            for share in (0.5, 1.0):
                offsets = [int(p * share) for p in past]
                bases, owns = [], []
                for kv, off, p in zip(kvs, offsets, past):
                    base = torch.full((layers, 2, kv_heads, off + 5, head_dim), float("nan"))
                    base[:, :, :, :off] = kv[:, :, :, :off]
                    own = torch.full((layers, 2, kv_heads, kv.shape[3] - off, head_dim), float("nan"))
                    own[:, :, :, :p - off] = kv[:, :, :, off:p]
                    bases.append(base if off else torch.empty(0))
                    owns.append(own)
                got = cpu.decode_attention(q, k_new, v_new, owns, layer, past, lens, scale, bases, offsets)
                torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-6,
                                           msg=lambda text, case=(isa, past, lens, share): f"{case}: {text}")
                for own, want_kv, off, p, t in zip(owns, want_kvs, offsets, past, lens):
                    assert torch.equal(own[layer, :, :, :p + t - off], want_kv[layer, :, :, off:p + t])
    with pytest.raises(RuntimeError, match="do not fit its buffer"):
        cpu.decode_attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8),
                             [torch.randn(1, 2, 2, 4, 8)], 0, [4], [1], 1.0)
    with pytest.raises(RuntimeError, match="prefix buffer holds 2 positions, not the 3"):
        cpu.decode_attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8),
                             [torch.randn(1, 2, 2, 4, 8)], 0, [3], [1], 1.0, [torch.randn(1, 2, 2, 2, 8)], [3])
    with pytest.raises(RuntimeError, match="multiple of KV heads"):
        cpu.decode_attention(torch.randn(1, 1, 5, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8),
                             [torch.randn(1, 2, 2, 4, 8)], 0, [0], [1], 1.0)
