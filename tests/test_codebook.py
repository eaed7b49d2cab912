import pytest
import torch

from quant.base import QuantConfigError, quantize_rtn
from quant.codebook import _nearest, kmeans_1d, quantize_codebook


def test_kmeans_finds_well_separated_clusters():
    torch.manual_seed(0)
    centers = torch.linspace(-1, 1, 16)
    x = (centers[torch.randint(16, (4, 512))] + 0.001 * torch.randn(4, 512))
    c, assign = kmeans_1d(x)
    assert (x - torch.gather(c, 1, assign)).abs().max() < 0.01


def test_nearest_centroid_search_equals_argmin_distance():
    torch.manual_seed(0)
    c = torch.randn(8, 16).sort(1).values
    c[0, 5] = c[0, 4]  # a duplicated centroid: either index is nearest
    x = torch.cat([torch.randn(8, 300) * 2, (c[:, 1:] + c[:, :-1]) / 2], 1)  # and the midpoints (ties)
    want = (x[:, :, None] - c[:, None, :]).abs().argmin(-1)
    got = _nearest(x, c)
    torch.testing.assert_close((x - torch.gather(c, 1, got)).abs(), (x - torch.gather(c, 1, want)).abs())
    assert torch.equal(got[1:, :300], want[1:, :300])


def test_kmeans_centroids_come_sorted_and_assignments_are_nearest():
    torch.manual_seed(1)
    x = torch.randn(6, 400)
    c, assign = kmeans_1d(x)
    assert torch.all(c[:, 1:] >= c[:, :-1])
    best = (x[:, :, None] - c[:, None, :]).abs().min(-1).values
    torch.testing.assert_close((x - torch.gather(c, 1, assign)).abs(), best)


def test_codebook_beats_uniform_4bit_on_heavy_tailed_weights():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 256)) * 0.02
    cb = quantize_codebook(w)
    err_cb = (w - cb.dequantize()).pow(2).mean()
    err_rtn = (w - quantize_rtn(w, 4, 256).dequantize()).pow(2).mean()
    assert err_cb < 0.5 * err_rtn
    assert cb.bits_per_weight() == pytest.approx(4 + 256 / 256)
    assert quantize_codebook(w, 128).centroids.shape == (64, 2, 16)
    with pytest.raises(QuantConfigError, match="does not divide"):
        quantize_codebook(w, 96)


def test_activation_weighted_codebooks_lower_the_output_error():
    """Inputs whose columns differ in scale (as real activations do): weighting k-means by each column's mean
    squared activation lowers the output error x (W - Wq)^T that the unweighted codebook leaves, on held-out x."""
    torch.manual_seed(0)
    w = torch.distributions.StudentT(4.0).sample((48, 256)) * 0.02
    col = torch.exp(torch.randn(256) * 1.5)  # per-column activation scale, a few columns dominate
    x_calib, x_test = torch.randn(512, 256) * col, torch.randn(512, 256) * col
    importance = x_calib.pow(2).mean(0)

    def out_err(cb):
        return (x_test @ (w - cb.dequantize()).T).pow(2).mean()

    plain, weighted = quantize_codebook(w), quantize_codebook(w, importance=importance)
    assert out_err(weighted) < 0.7 * out_err(plain)
    # the weighted error it minimises is lower too, and the plain squared weight error is higher (a real trade)
    werr = lambda cb: ((w - cb.dequantize()).pow(2) * importance).sum()  # noqa: E731
    assert werr(weighted) < werr(plain)
    assert (w - weighted.dequantize()).pow(2).mean() > (w - plain.dequantize()).pow(2).mean()
    assert torch.equal(quantize_codebook(w).packed, plain.packed)  # unweighted stays deterministic
    with pytest.raises(QuantConfigError, match="importance has shape"):
        quantize_codebook(w, importance=importance[:100])
