import pytest
import torch

from quant.base import QuantConfigError, quantize_hqq, quantize_rtn
from qkernels.packing import pack, packed_words, unpack


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [32, 64, 100, 7])
def test_packing_round_trips_with_no_wasted_bits(bits, n):
    g = torch.Generator().manual_seed(bits * 100 + n)
    q = torch.randint(0, 1 << bits, (5, n), generator=g, dtype=torch.uint8)
    words = pack(q, bits)
    assert words.dtype == torch.int32 and words.shape == (5, packed_words(n, bits))
    if n % 32 == 0:
        assert words.numel() * 32 == q.numel() * bits  # exactly b words per 32 values
    assert torch.equal(unpack(words, bits, n), q)


def test_packing_errors():
    with pytest.raises(ValueError, match="5-bit"):
        pack(torch.zeros(1, 32, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.full((1, 32), 8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="need"):
        unpack(torch.zeros(1, 4, dtype=torch.int32), 3, 64)


@pytest.mark.parametrize("bits, group", [(3, 64), (4, 128), (2, 32), (8, 64)])
def test_rtn_error_bound_and_hqq_not_worse(bits, group):
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    w[3, 10] = 0.5  # an outlier
    qt = quantize_rtn(w, bits, group)
    # RTN: every weight lies within half a step of its code (plus the fp16 rounding of scale and zero)
    step = qt.scale.float().repeat_interleave(group, 1)
    zero_err = qt.zero.float().repeat_interleave(group, 1).abs() * 1e-3 * step
    assert ((w - qt.dequantize()).abs() <= 0.5 * step * 1.01 + zero_err + 1e-6).all()
    rtn_err = (w - quantize_rtn(w, bits, group).dequantize()).abs().mean()
    hqq_err = (w - quantize_hqq(w, bits, group).dequantize()).abs().mean()
    assert hqq_err <= rtn_err * 1.001
    assert quantize_rtn(w, bits, group).bits_per_weight() == bits + 32 / group


def test_padded_last_group():
    torch.manual_seed(1)
    w = torch.randn(16, 576) * 0.02
    qt = quantize_rtn(w, 4, 128, pad=True)
    assert qt.dequantize().shape == (16, 576) and qt.scale.shape == (16, 5)
    assert (w - qt.dequantize()).abs().max() < 0.6 * qt.scale.float().max() + 1e-6
    assert qt.bits_per_weight() == pytest.approx(4 + 32 * 5 / 576)


def test_unsupported_settings_are_clear_errors():
    w = torch.randn(8, 96)
    with pytest.raises(QuantConfigError, match="5-bit"):
        quantize_hqq(w, 5, 32)
    with pytest.raises(QuantConfigError, match="does not divide"):
        quantize_rtn(w, 3, 64)


def test_constant_groups_and_rank_one_compensators_stay_finite():
    from quant.milo import quantize_milo

    w = torch.tensor([[0.3] * 32 + [-0.2] * 32 + [0.0] * 32])
    assert torch.equal(quantize_rtn(w, 3, 32).dequantize(), w.half().float())
    m = quantize_milo(torch.randn(64, 96) * 0.05, rank=1, rounds=1, group_size=32)  # U: groups of one value
    assert torch.isfinite(m.u.dequantize()).all() and torch.isfinite(m.dequantize()).all()
