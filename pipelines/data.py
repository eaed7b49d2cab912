"""Problems for the jobs: reasoning-gym generators, local JSONL, hub datasets; chat-templated prompts."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rewards.answers import gold_answer

log = logging.getLogger(__name__)

# Hub datasets by short name: (dataset id, config); loaded through `datasets` when a hub is reachable.
HUB = {
    "gsm8k": ("openai/gsm8k", "main"),
    "math500": ("HuggingFaceH4/MATH-500", None),
    "aime24": ("HuggingFaceH4/aime_2024", None),
    "aime25": ("math-ai/aime25", None),
}


class DataError(ValueError):
    pass


@dataclass
class Problem:
    id: str
    question: str
    answer: str | None
    meta: dict = field(default_factory=dict)


@dataclass
class Problems:
    items: list[Problem]
    skipped_rows: int = 0


def load_problems(cfg) -> Problems:
    """Problems for a `pipelines.config.DataConfig`: rows offset..offset+num_problems."""
    if cfg.source == "reasoning_gym":
        return Problems(_reasoning_gym(cfg))
    if cfg.source == "jsonl":
        return _jsonl(cfg)
    return _hub(cfg)


def _reasoning_gym(cfg) -> list[Problem]:
    import reasoning_gym

    try:
        data = reasoning_gym.create_dataset(cfg.name, size=cfg.offset + cfg.num_problems, seed=cfg.seed)
    except Exception as exc:
        raise DataError(f"reasoning-gym dataset {cfg.name!r}: {exc}") from None
    out = []
    for i in range(cfg.offset, cfg.offset + cfg.num_problems):
        row = data[i]
        out.append(Problem(f"{cfg.name}-{cfg.seed}-{i}", row["question"], str(row["answer"])))
    return out


def _rows_to_problems(rows, cfg, where: str) -> Problems:
    out, skipped = [], 0
    for i, row in rows:
        problem = None
        if not isinstance(row, dict):
            reason = f"is not an object ({type(row).__name__})"
        elif not isinstance(row.get(cfg.question_field), str) or not row[cfg.question_field].strip():
            reason = f"has no text field {cfg.question_field!r}"
        else:
            answer = row.get(cfg.answer_field)
            problem = Problem(str(row.get("id", f"{where}-{i}")), row[cfg.question_field],
                              None if answer is None else gold_answer(answer))
        if problem is None:
            if cfg.bad_rows == "error":
                raise DataError(f"{where} row {i} {reason} (set data.bad_rows=skip to skip such rows)")
            skipped += 1
            log.warning("skipping %s row %d: %s", where, i, reason)
            continue
        out.append(problem)
    if skipped:
        log.warning("%s: skipped %d malformed rows", where, skipped)
    return Problems(out[cfg.offset:cfg.offset + cfg.num_problems], skipped)


def _jsonl(cfg) -> Problems:
    if not cfg.path:
        raise DataError("data.source=jsonl needs data.path")
    path = Path(cfg.path)
    if not path.is_file():
        raise DataError(f"data.path {cfg.path!r} does not exist")

    def rows():
        with path.open() as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as exc:
                    yield lineno, f"invalid JSON ({exc.msg})"

    return _rows_to_problems(rows(), cfg, str(path))


def _hub(cfg) -> Problems:
    import datasets

    dataset_id, config = HUB.get(cfg.name, (cfg.name, None))
    try:
        ds = datasets.load_dataset(dataset_id, config, split=cfg.split)
    except Exception as exc:
        raise DataError(f"cannot load hub dataset {dataset_id!r} (split {cfg.split!r}): {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}. Without a reachable hub, export it to "
                        "JSONL and use data.source=jsonl data.path=FILE") from None
    return _rows_to_problems(enumerate(ds), cfg, dataset_id)


def prompt_ids(tokenizer, problem: Problem, cfg) -> list[int]:
    """Token ids of the chat-templated prompt (system prompt + question, generation prompt added)."""
    if cfg.chat_template and tokenizer.chat_template:
        messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        messages.append({"role": "user", "content": problem.question})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = f"{cfg.system_prompt}\n\n{problem.question}\n\n" if cfg.system_prompt else f"{problem.question}\n\n"
    return tokenizer(text).input_ids
