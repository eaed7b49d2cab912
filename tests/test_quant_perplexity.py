"""Perplexity protocols' arithmetic and the hub text sources' offline error."""

import math

import pytest
import torch

from quant.perplexity import TextSourceError, eval_text, perplexity, windows


def _scored(spans):
    return [t for s, e, skip in spans for t in range(s + max(skip, 1), e)]


@pytest.mark.parametrize("n,window,stride", [(100, 16, 4), (101, 16, 5), (17, 16, 15), (40, 16, 1), (1000, 64, 16)])
def test_sliding_scores_every_token_once_with_enough_context(n, window, stride):
    spans = windows(n, window, stride, "sliding")
    scored = _scored(spans)
    assert sorted(scored) == list(range(1, n))  # every token but the first, exactly once
    for s, e, skip in spans:
        assert e - s <= window
        if s > 0:
            assert skip >= window - stride  # context of the first scored token in the window


def test_non_overlapping_windows_are_disjoint():
    spans = windows(100, 16, None, "non_overlapping")
    assert [(s, e) for s, e, _ in spans] == [(i, min(i + 16, 100)) for i in range(0, 100, 16)]
    assert len(_scored(spans)) == 100 - len(spans)  # each window's first token is context only
    with pytest.raises(ValueError, match="protocol"):
        windows(100, 16, None, "strided")
    with pytest.raises(ValueError, match="stride"):
        windows(100, 16, 32, "sliding")
    with pytest.raises(ValueError, match="stride"):
        windows(100, 16, 16, "sliding")


class _Uniform(torch.nn.Module):
    """Uniform logits over 8 tokens: every NLL is log 8, so any protocol's perplexity is exactly 8."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, chunk):
        class Out:
            pass

        out = Out()
        out.logits = torch.zeros(1, chunk.shape[1], 8)  # uniform over 8 tokens: every NLL is log 8
        return out


def test_perplexity_uses_the_protocols():
    ids = torch.arange(200) % 8
    assert perplexity(_Uniform(), ids, 32) == pytest.approx(8.0)
    assert perplexity(_Uniform(), ids, 32, stride=8, protocol="sliding") == pytest.approx(8.0)
    assert math.isfinite(perplexity(_Uniform(), ids[:2], 32, protocol="sliding"))


@pytest.mark.parametrize("source,name", [("wikitext2", "wikitext"), ("c4", "allenai/c4")])
def test_hub_text_offline_gives_a_clear_error(source, name, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with pytest.raises(TextSourceError) as info:
        eval_text(source)
    msg = str(info.value)
    assert source in msg and name in msg and "HF_DATASETS_OFFLINE" in msg and "pydoc" in msg
    with pytest.raises(ValueError, match="unknown text source"):
        eval_text("ptb")
    assert "Python" in eval_text("pydoc")
