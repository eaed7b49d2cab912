import pytest
import torch

from quant.base import QuantConfigError, quantize_hqq
from quant.milo import quantize_milo


def _weight():
    torch.manual_seed(0)
    low = torch.randn(128, 8) @ torch.randn(8, 256) * 0.05  # a low-rank structure HQQ cannot capture
    return low + torch.randn(128, 256) * 0.02


def test_milo_compensator_cuts_the_error_of_hqq():
    w = _weight()
    hqq_err = (w - quantize_hqq(w, 3, 64).dequantize()).norm()
    errs = [(w - quantize_milo(w, rank=r, rounds=5).dequantize()).norm() for r in (0, 8, 32)]
    assert errs[0] == pytest.approx(hqq_err.item(), rel=1e-6)  # rank 0 is plain HQQ
    assert errs[1] < 0.9 * hqq_err and errs[2] < 0.8 * errs[1]  # measured: 0.84x and 0.65x of HQQ


def test_milo_bits_per_weight_count_everything():
    w = _weight()
    m = quantize_milo(w, rank=16, rounds=2)
    base = 3 + 32 / 64
    u_bits = 128 * 16 * (3 + 32 / 16)
    v_bits = 16 * 256 * (3 + 32 / 64)
    assert m.bits_per_weight() == pytest.approx(base + (u_bits + v_bits) / (128 * 256))


def test_symmetric_compensators_cost_a_scale_per_group_and_keep_the_gain():
    """The paper's storage: symmetric 3-bit factors (codes dequantize to +-s/2 .. +-7s/2, no zero stored)."""
    from quant.base import quantize_rtn, quantize_symmetric

    w = _weight()
    x = torch.randn(64, 128)
    q = quantize_symmetric(x, 3, 64)
    deq = q.dequantize()
    scale = x.abs().reshape(64, 2, 64).amax(-1) / 3.5
    levels = deq.reshape(64, 2, 64) / scale.half().float()[..., None]
    assert torch.allclose(levels * 2, torch.round(levels * 2)) and levels.abs().max() <= 3.5 + 1e-6
    assert (levels * 2).remainder(2).eq(1).all()  # odd multiples of s/2: the grid is symmetric about 0
    assert q.bits_per_weight() == pytest.approx(3 + 16 / 64)
    assert (x - deq).norm() < 1.3 * (x - quantize_rtn(x, 3, 64).dequantize()).norm()
    asym, sym = (quantize_milo(w, rank=16, rounds=2, compensator=c) for c in ("asymmetric", "symmetric"))
    assert sym.bits_per_weight() == pytest.approx(asym.bits_per_weight() - (128 * 16 / 16 + 16 * 256 / 64) * 16
                                                  / (128 * 256))
    hqq_err = (w - quantize_hqq(w, 3, 64).dequantize()).norm()
    assert (w - sym.dequantize()).norm() < 0.9 * hqq_err
    with pytest.raises(QuantConfigError, match="compensator format"):
        quantize_milo(w, rank=8, compensator="nf3")


def test_milo_settings_errors():
    w = _weight()
    with pytest.raises(QuantConfigError, match="3-bit"):
        quantize_milo(w, rank=8, bits=5)
    with pytest.raises(QuantConfigError, match="rank"):
        quantize_milo(w, rank=1000)


def _with_kurtosis(rows: int, cols: int, nonzero: int) -> torch.Tensor:
    """A matrix of zeros and +-1 (balanced, mean 0) whose excess kurtosis is exactly entries / nonzero - 3."""
    w = torch.zeros(rows * cols)
    w[:nonzero // 2], w[nonzero // 2:nonzero] = 1.0, -1.0
    return w[torch.randperm(rows * cols, generator=torch.Generator().manual_seed(0))].reshape(rows, cols)


def test_rank_policies_on_fixed_inputs():
    """rank_of: uniform by kind; kurtosis k -> 0 below 1, 2^(ceil(k) + 2) up to 9, rank_max above; frequency:
    rank_expert * E * share (the experts' mean is rank_expert); mixed: uniform dense layers, kurtosis experts;
    every rank capped at rank_max and the matrix's smaller side."""
    from quant.apply import QuantSpec, excess_kurtosis, rank_of

    k25, k13, flat = _with_kurtosis(40, 55, 400), _with_kurtosis(16, 64, 64), torch.linspace(-1, 1, 2048).reshape(32, 64)
    assert excess_kurtosis(k25) == pytest.approx(2.5) and excess_kurtosis(k13) == pytest.approx(13)
    assert excess_kurtosis(flat) == pytest.approx(-1.2, abs=0.01)  # uniform
    uni = QuantSpec("milo", rank_dense=16, rank_expert=8)
    assert rank_of(uni, "attention", 0, None, flat) == 16 and rank_of(uni, "expert", 0, 3, flat) == 8
    kurt = QuantSpec("milo", rank_policy="kurtosis", rank_max=12)
    assert [rank_of(kurt, "attention", 0, None, w) for w in (flat, k25, k13)] == [0, 12, 12]  # 32 capped at 12
    kurt.rank_max = 1024
    assert [rank_of(kurt, "expert", 0, 1, w) for w in (flat, k25, k13)] == [0, 32, 16]  # 1024 capped by 16 rows
    freq = QuantSpec("milo", rank_policy="frequency", rank_dense=16, rank_expert=8,
                     routing_frequency={0: [0.5, 0.25, 0.125, 0.125]})
    ranks = [rank_of(freq, "expert", 0, e, flat) for e in range(4)]
    assert ranks == [16, 8, 4, 4] and sum(ranks) / 4 == 8  # proportional to the share, mean = rank_expert
    assert rank_of(freq, "attention", 0, None, flat) == 16
    mixed = QuantSpec("milo", rank_policy="mixed", rank_dense=24, rank_expert=8)
    assert rank_of(mixed, "attention", 0, None, k25) == 24 and rank_of(mixed, "shared_expert", 0, None, k25) == 24
    assert rank_of(mixed, "expert", 0, 0, k25) == 32 and rank_of(mixed, "expert", 0, 0, flat) == 0
    assert rank_of(QuantSpec("hqq", rank_policy="kurtosis"), "expert", 0, 0, k25) == 0  # only MiLo has ranks
    with pytest.raises(QuantConfigError, match="rank policy"):
        QuantSpec("milo", rank_policy="outliers").check()
