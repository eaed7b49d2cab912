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


def test_milo_settings_errors():
    w = _weight()
    with pytest.raises(QuantConfigError, match="3-bit"):
        quantize_milo(w, rank=8, bits=5)
    with pytest.raises(QuantConfigError, match="rank"):
        quantize_milo(w, rank=1000)
