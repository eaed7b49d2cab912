"""Problems for the jobs: reasoning-gym generators, local JSONL, hub datasets; chat-templated prompts."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rewards.answers import gold_answer

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class HubDataset:
    """A hub dataset's id, config, split and fields, as its repository has them."""

    dataset_id: str
    config: str | None
    split: str
    question_field: str
    answer_field: str  # gold answers: GSM8K's "... #### 42", MATH's LaTeX, AIME's integers (`gold_answer` reads each)


# Hub datasets by short name, loaded through `datasets` (from the hub, its cache, or a local copy in the hub layout:
# data.path); data.split, data.question_field and data.answer_field override what is given here.
HUB = {
    "gsm8k": HubDataset("openai/gsm8k", "main", "test", "question", "answer"),
    "math500": HubDataset("HuggingFaceH4/MATH-500", None, "test", "problem", "answer"),
    "aime24": HubDataset("HuggingFaceH4/aime_2024", None, "train", "problem", "answer"),
    "aime25": HubDataset("math-ai/aime25", None, "test", "problem", "answer"),
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


def _rows_to_problems(rows, cfg, where: str, fields: tuple[str, str] = ("question", "answer")) -> Problems:
    """Problems from (row number, row) pairs; `fields` are the question and answer fields unless data.question_field
    or data.answer_field say otherwise."""
    question_field = cfg.question_field or fields[0]
    answer_field = cfg.answer_field or fields[1]
    out, skipped = [], 0
    for i, row in rows:
        problem = None
        if not isinstance(row, dict):
            reason = f"is not an object ({type(row).__name__})"
        elif not isinstance(row.get(question_field), str) or not row[question_field].strip():
            reason = f"has no text field {question_field!r}"
        else:
            answer = row.get(answer_field)
            problem = Problem(str(row.get("id", f"{where}-{i}")), row[question_field],
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


def hub_dataset(cfg) -> HubDataset:
    """The hub dataset a DataConfig names: a short name of HUB or any dataset id, with the config's overrides."""
    known = HUB.get(cfg.name, HubDataset(cfg.name, None, "test", "question", "answer"))
    return HubDataset(known.dataset_id, known.config, cfg.split or known.split, cfg.question_field or
                      known.question_field, cfg.answer_field or known.answer_field)


def _hub(cfg) -> Problems:
    import datasets

    hub = hub_dataset(cfg)
    source = cfg.path or hub.dataset_id  # a local copy in the hub layout (its README's configs), or the hub id
    if cfg.path and not Path(cfg.path).is_dir():
        raise DataError(f"data.path {cfg.path!r} is not a directory (a local copy of {hub.dataset_id!r})")
    try:
        ds = datasets.load_dataset(source, hub.config, split=hub.split)
    except Exception as exc:
        raise DataError(f"cannot load hub dataset {hub.dataset_id!r} (split {hub.split!r}"
                        f"{', from ' + cfg.path if cfg.path else ''}): {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}. Without a reachable hub, give a local copy "
                        "(data.path=DIR) or export it to JSONL and use data.source=jsonl data.path=FILE") from None
    return _rows_to_problems(enumerate(ds), cfg, hub.dataset_id, (hub.question_field, hub.answer_field))


def prompt_ids(tokenizer, problem: Problem, cfg) -> list[int]:
    """Token ids of the chat-templated prompt (system prompt + question, generation prompt added)."""
    if cfg.chat_template and tokenizer.chat_template:
        messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
        messages.append({"role": "user", "content": problem.question})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    text = f"{cfg.system_prompt}\n\n{problem.question}\n\n" if cfg.system_prompt else f"{problem.question}\n\n"
    return tokenizer(text).input_ids
