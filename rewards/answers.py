"""Final-answer extraction (last \\boxed{...}, else the last number) and checking with math-verify."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind("\\boxed")
    while start != -1:
        i = text.find("{", start)
        if i == -1:
            return None
        depth = 0
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + 1:j].strip()
        start = text.rfind("\\boxed", 0, start)  # unbalanced: try an earlier one
    return None


def extract_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def gold_answer(raw: str) -> str:
    """Gold answers as datasets store them: GSM8K's '... #### 42', a \\boxed{} solution, or a bare answer."""
    raw = str(raw)
    if "####" in raw:
        return raw.rsplit("####", 1)[1].strip().replace(",", "")
    return last_boxed(raw) or raw.strip()


def is_correct(predicted: str | None, gold: str) -> bool:
    if predicted is None:
        return False
    if predicted.strip() == gold.strip():
        return True
    from math_verify import parse, verify

    def as_math(s: str) -> str:
        return s if "$" in s or "\\" in s else f"${s}$"

    try:
        return bool(verify(parse(as_math(gold)), parse(as_math(predicted))))
    except Exception:  # math-verify raises on unparsable input: that is a wrong answer, not a crash
        return False
