import json

import pytest

from rewards.answers import extract_answer, gold_answer, is_correct, last_boxed
from pipelines.schema import DataConfig
from pipelines.data import DataError, load_problems, prompt_ids


def test_reasoning_gym_is_seeded_and_offset():
    a = load_problems(DataConfig(name="gsm_symbolic", num_problems=3, seed=7)).items
    b = load_problems(DataConfig(name="gsm_symbolic", num_problems=3, seed=7)).items
    c = load_problems(DataConfig(name="gsm_symbolic", num_problems=2, seed=7, offset=1)).items
    assert [p.question for p in a] == [p.question for p in b]
    assert [p.question for p in c] == [p.question for p in a[1:]]
    assert all(p.answer for p in a)
    for name in ("chain_sum", "basic_arithmetic"):
        [p] = load_problems(DataConfig(name=name, num_problems=1)).items
        assert p.question and p.answer is not None


def _write(tmp_path, lines):
    f = tmp_path / "data.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_jsonl_fields_and_bad_rows(tmp_path):
    f = _write(tmp_path, [json.dumps({"q": "1+1?", "a": "#### 2"}), "{not json",
                          json.dumps({"a": "3"}), json.dumps({"q": "2+2?", "a": "\\boxed{4}"})])
    cfg = DataConfig(source="jsonl", path=str(f), question_field="q", answer_field="a", num_problems=10)
    with pytest.raises(DataError, match="row 2 is not an object"):
        load_problems(cfg)
    cfg.bad_rows = "skip"
    got = load_problems(cfg)
    assert got.skipped_rows == 2
    assert [(p.question, p.answer) for p in got.items] == [("1+1?", "2"), ("2+2?", "4")]
    cfg.path = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        load_problems(cfg)


def test_hub_without_network_is_a_clear_error():
    with pytest.raises(DataError, match="cannot load hub dataset 'openai/gsm8k'.*data.source=jsonl"):
        load_problems(DataConfig(source="hub", name="gsm8k"))


@pytest.mark.parametrize("text, want", [
    ("so the total is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("we get 12 apples and 1,250 pears", "1250"),
    ("no number here", None),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_checking_with_math_verify():
    assert is_correct("0.5", "\\frac{1}{2}")
    assert is_correct("42", gold_answer("Natalia sold 48/2 = 24 clips.\n#### 42"))
    assert not is_correct("41", "42")
    assert not is_correct(None, "42")
    assert last_boxed("\\boxed{x") is None


def test_prompt_uses_the_chat_template(smollm):
    _, tok = smollm
    [p] = load_problems(DataConfig(name="chain_sum", num_problems=1)).items
    ids = prompt_ids(tok, p, DataConfig())
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system") and p.question in text
    assert text.endswith("<|im_start|>assistant\n")


def test_jsonl_rows_cut_by_a_killed_run_are_redone_not_lost(tmp_path):
    """A run killed while appending leaves a row cut short at the end of its JSONL file: reading leaves it out, the
    resumed run's next row starts a line of its own (appended after the cut text, that row and every row after it
    were lost to later reads), and a corrupt line in the middle is an error for a job reading its input."""
    from pipelines.runs import JsonlError, append_jsonl, read_jsonl

    path = tmp_path / "rows.jsonl"
    append_jsonl(path, {"id": 1})
    with path.open("a") as f:
        f.write('{"id": 2, "text": "cut sh')  # the killed writer
    with pytest.warns(UserWarning, match="line 2 was cut short"):
        assert read_jsonl(path) == [{"id": 1}]
    append_jsonl(path, {"id": 2})
    append_jsonl(path, {"id": 3})
    assert read_jsonl(path, strict=True) == [{"id": 1}, {"id": 2}, {"id": 3}]
    assert path.read_text() == "".join(json.dumps({"id": i}) + "\n" for i in (1, 2, 3))

    hand = tmp_path / "hand.jsonl"
    hand.write_text('{"id": 1}\n{"id": 2}')  # a complete last row without its newline is kept
    assert read_jsonl(hand) == [{"id": 1}, {"id": 2}]
    append_jsonl(hand, {"id": 3})
    assert read_jsonl(hand, strict=True) == [{"id": 1}, {"id": 2}, {"id": 3}]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n{"id": 2, oops}\n{"id": 3}\n')
    with pytest.raises(JsonlError, match="line 2 is not JSON"):
        read_jsonl(bad, strict=True)
    with pytest.warns(UserWarning, match="line 2 is not JSON"):
        assert read_jsonl(bad) == [{"id": 1}, {"id": 3}]


# what each hub repository holds: (config, split, file path in the repository, rows); a README's `configs` header
# maps splits to files as on the hub
HUB_COPIES = {
    "gsm8k": ("main", "test", "main/test-00000-of-00001.parquet",
              [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}]),
    "math500": (None, "test", "test.jsonl",
                [{"problem": "What is $\\frac{1}{2} + \\frac{1}{4}$?", "solution": "...", "answer": "\\frac{3}{4}",
                  "subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}]),
    "aime24": (None, "train", "data/train-00000-of-00001.parquet",
               [{"id": 60, "problem": "Find the remainder when 2024 is divided by 1000.", "solution": "...",
                 "answer": "024", "url": "", "year": "2024"}]),
    "aime25": (None, "test", "test.jsonl", [{"problem": "Compute 17 + 25.", "answer": "42", "id": "0"}]),
}


def _hub_copy(root, name):
    """A local copy of a hub dataset's repository: its data file(s) and a README whose configs name the split."""
    import datasets

    config, split, path, rows = HUB_COPIES[name]
    repo = root / name
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    if path.endswith(".parquet"):
        datasets.Dataset.from_list(rows).to_parquet(str(repo / path))
    else:
        (repo / path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (repo / "README.md").write_text(f"---\nconfigs:\n- config_name: {config or 'default'}\n  data_files:\n"
                                    f"  - split: {split}\n    path: {path}\n---\n")
    return repo


@pytest.mark.parametrize("name, question, answer", [
    ("gsm8k", "Tom has 3 apples", "7"), ("math500", "\\frac{1}{2}", "\\frac{3}{4}"),
    ("aime24", "divided by 1000", "024"), ("aime25", "17 + 25", "42")])
def test_hub_datasets_load_with_their_own_split_and_fields(tmp_path, name, question, answer):
    """Each short name knows its dataset's config, split and fields (AIME 2024 has only a train split, MATH-500 and
    AIME a `problem` field): no overrides needed, here on local copies in the hub layout."""
    repo = _hub_copy(tmp_path, name)
    [p] = load_problems(DataConfig(source="hub", name=name, path=str(repo), num_problems=5)).items
    assert question in p.question and p.answer == answer
    assert is_correct(answer, p.answer)
    with pytest.raises(DataError, match=r"split 'validation'"):  # an override still wins, and a bad one is named
        load_problems(DataConfig(source="hub", name=name, path=str(repo), split="validation"))
    with pytest.raises(DataError, match="has no text field 'prompt'"):
        load_problems(DataConfig(source="hub", name=name, path=str(repo), question_field="prompt"))
