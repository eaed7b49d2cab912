"""Perplexity on real text, with the two usual protocols.

- `non_overlapping`: consecutive windows of `window` tokens, every token scored once with the context inside its
  window (what GPTQ/HQQ papers report as "ppl at 2048").
- `sliding`: windows of `window` tokens moved by `stride`; only the last `stride` tokens of each window are scored,
  so every scored token sees at least `window - stride` tokens of context (MiLo's 2048/512 protocol).
"""

from __future__ import annotations

import math

import torch


def pydoc_text() -> str:
    """Real English text that ships with Python (no download): the pydoc topic help pages."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


@torch.inference_mode()
def perplexity(model, token_ids: torch.Tensor, window: int = 512, stride: int | None = None,
               protocol: str = "non_overlapping") -> float:
    """exp(mean NLL) of `token_ids` (1-D) under `model` (a transformers causal LM)."""
    if protocol not in ("non_overlapping", "sliding"):
        raise ValueError(f"unknown perplexity protocol {protocol!r}: use 'non_overlapping' or 'sliding'")
    ids = token_ids.reshape(-1)
    device = next(model.parameters()).device
    n = ids.numel()
    if n < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    nll_sum, count = 0.0, 0
    if protocol == "non_overlapping":
        spans = [(s, min(s + window, n), 0) for s in range(0, n - 1, window)]
    else:
        stride = stride or window // 4
        spans, prev_end = [], 0
        for s in range(0, n - 1, stride):
            e = min(s + window, n)
            spans.append((s, e, prev_end - s if prev_end > s else 0))  # score only tokens after prev_end
            prev_end = e
            if e == n:
                break
    for start, end, skip in spans:
        chunk = ids[start:end].to(device).unsqueeze(0)
        if chunk.shape[1] < 2:
            continue
        logits = model(chunk).logits.float()[0, :-1]
        targets = chunk[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
        nll = nll[max(skip - 1, 0):]
        nll_sum += nll.sum().item()
        count += nll.numel()
    return math.exp(nll_sum / count)
