"""Perplexity on real text, with the two usual protocols.

- `non_overlapping`: consecutive windows of `window` tokens, every token scored once with the context inside its
  window (what GPTQ/HQQ papers report as "ppl at 2048").
- `sliding`: windows of `window` tokens moved by `stride`; only the last `stride` tokens of each window are scored,
  so every scored token sees at least `window - stride` tokens of context (MiLo's 2048/512 protocol).
"""

from __future__ import annotations

import math
import os

import torch


def pydoc_text() -> str:
    """Real English text that ships with Python (no download): the pydoc topic help pages."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


TEXT_SOURCES = ("pydoc", "wikitext2", "c4")
_HUB = {  # name -> (load_dataset args, kwargs, how the rows are joined, the column)
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), {"split": "test"}, "\n\n", "text"),
    "c4": (("allenai/c4",), {"data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"},
                             "split": "validation"}, " ", "text"),
}


class TextSourceError(RuntimeError):
    """An evaluation text that cannot be loaded here (a hub dataset with no network or cache)."""


def eval_text(source: str = "pydoc", max_rows: int | None = None) -> str:
    """The evaluation text: `pydoc` (ships with Python), `wikitext2` (WikiText-2 raw test split, rows joined by
    blank lines as the GPTQ/HQQ/MiLo evaluations do) or `c4` (the first shard of C4 en validation, documents joined
    by spaces; `max_rows` documents, default 1,100) through `datasets` (needs the hub or a filled HF cache)."""
    if source == "pydoc":
        return pydoc_text()
    if source not in _HUB:
        raise ValueError(f"unknown text source {source!r}: use one of {', '.join(TEXT_SOURCES)}")
    args, kwargs, sep, column = _HUB[source]
    call = f"datasets.load_dataset({', '.join(repr(a) for a in args)}, " + ", ".join(
        f"{k}={v!r}" for k, v in kwargs.items()) + ")"
    try:
        import datasets

        rows = datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 (offline, no cache, hub errors: one clear message, no stack trace)
        raise TextSourceError(
            f"cannot load the {source} text ({call}): {type(exc).__name__}: {str(exc).splitlines()[0][:200]}. "
            f"It comes from the Hugging Face hub: run once where the hub is reachable (HF_DATASETS_OFFLINE unset) "
            f"to fill the datasets cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}"
            f"), or use the offline text source `pydoc`") from None
    if source == "c4":
        rows = rows.select(range(min(len(rows), max_rows or 1100)))
    elif max_rows:
        rows = rows.select(range(min(len(rows), max_rows)))
    return sep.join(rows[column])


def windows(n: int, window: int, stride: int | None = None, protocol: str = "non_overlapping"
            ) -> list[tuple[int, int, int]]:
    """The (start, end, skip) spans over `n` tokens; a span scores its tokens start+max(skip, 1) .. end-1, each
    predicted from its prefix inside the span. Non-overlapping: disjoint windows (a window's first token is only
    context). Sliding: every token 1..n-1 is scored exactly once, after the first window with at least
    window - stride tokens of context."""
    if protocol not in ("non_overlapping", "sliding"):
        raise ValueError(f"unknown perplexity protocol {protocol!r}: use 'non_overlapping' or 'sliding'")
    if protocol == "non_overlapping":
        return [(s, min(s + window, n), 0) for s in range(0, n - 1, window)]
    stride = stride or window // 4
    if not 0 < stride < window:  # stride == window would leave each window's first token unscored
        raise ValueError(f"sliding stride {stride} must be in 1..window-1 ({window - 1}); stride = window is "
                         "the non_overlapping protocol")
    spans, prev_end = [], 0
    for s in range(0, n - 1, stride):
        e = min(s + window, n)
        spans.append((s, e, prev_end - s if prev_end > s else 0))  # score only tokens after prev_end
        prev_end = e
        if e == n:
            break
    return spans


@torch.inference_mode()
def perplexity(model, token_ids: torch.Tensor, window: int = 512, stride: int | None = None,
               protocol: str = "non_overlapping") -> float:
    """exp(mean NLL) of `token_ids` (1-D) under `model` (a transformers causal LM)."""
    ids = token_ids.reshape(-1)
    device = next(model.parameters()).device
    n = ids.numel()
    if n < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    nll_sum, count = 0.0, 0
    spans = windows(n, window, stride, protocol)
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
