"""Every step verifier on fixed inputs: the decision rule each applies to what its model (a scripted host giving
fixed next-token probabilities, read through the real SmolLM2 tokenizer) or encoder returns."""

import asyncio

import pytest

from actors import zoo
from rewards import verifiers as V


@pytest.fixture(scope="module")
def tok():
    return zoo.load_tokenizer(zoo.SMOLLM2)


class ScriptedModel:
    """A host whose next-token probabilities are fixed per token id (0 for the rest); records every prompt."""

    def __init__(self, probs: dict[int, float]):
        self.probs, self.prompts = probs, []

    async def next_token_probs(self, prompts, token_ids):
        self.prompts += prompts
        return [[self.probs.get(t, 0.0) for t in token_ids] for _ in prompts]


class ScriptedEncoder:
    def __init__(self, sims):
        self.sims, self.texts = list(sims), []

    async def similarity_pairs(self, texts):
        self.texts += texts
        return self.sims[:len(texts) // 2]


def _item(draft="x = 3", target="x = 3", draft_ids=(1, 2), target_ids=(1, 2)):
    return V.Item("What is x?", "We solve.", draft, list(draft_ids), target, list(target_ids))


def _verify(verifier, items):
    return asyncio.run(verifier.verify(items))


def _first_id(tok, word):
    return tok(word, add_special_tokens=False).input_ids[0]


def test_exact_modes():
    loose = _item("X = 3 ", "x=3", (1, 2), (3, 4))
    assert [v.accept for v in _verify(V.Exact("normalized"), [loose])] == [True]  # case and whitespace ignored
    assert [v.accept for v in _verify(V.Exact("text"), [loose, _item()])] == [False, True]
    assert [v.accept for v in _verify(V.Exact("tokens"), [loose, _item("a", "b")])] == [False, True]
    with pytest.raises(V.VerifierError, match="mode 'fuzzy'"):
        V.Exact("fuzzy")


def test_tbvm_tests_the_ratio_of_yes_to_yes_plus_no_against_alpha(tok):
    """DREAM-R's test: p(yes) / (p(yes) + p(no)) > alpha, not p(yes) alone: 0.3 yes / 0.1 no passes at alpha 0.7
    (ratio 0.75) where raw p(yes) would not; 0.6 / 0.3 (ratio 0.667) fails."""
    yes, no = _first_id(tok, "yes"), _first_id(tok, "no")
    for p_yes, p_no, accept in ((0.3, 0.1, True), (0.6, 0.3, False), (0.0, 0.0, False)):
        model = ScriptedModel({yes: p_yes, no: p_no})
        [v] = _verify(V.TBVM(model, tok, alpha=0.7), [_item()])
        assert v.accept is accept and v.score == pytest.approx(p_yes / max(p_yes + p_no, 1e-30))
    # the ablation: the raw p(yes) against alpha (0.3 fails at 0.7 where its ratio passes; 0.75 passes)
    for p_yes, p_no, accept in ((0.3, 0.1, False), (0.75, 0.2, True)):
        [v] = _verify(V.TBVM(ScriptedModel({yes: p_yes, no: p_no}), tok, alpha=0.7, ratio=False), [_item()])
        assert v.accept is accept and v.score == pytest.approx(p_yes)
    prompt = tok.decode(model.prompts[0])
    assert "What is x?" in prompt and "We solve." in prompt and "x = 3" in prompt  # problem, context, the step
    with pytest.raises(V.VerifierError, match="alpha"):
        V.TBVM(model, tok, alpha=1.0)


def test_score_accepts_from_the_minimum_score(tok):
    """SpecReason: the most likely digit 0-9, accepted iff >= min_score (7 by default)."""
    digits = {d: _first_id(tok, str(d)) for d in range(10)}
    for best, accept in ((6, False), (7, True), (9, True), (0, False)):
        model = ScriptedModel({digits[d]: 0.01 for d in range(10)} | {digits[best]: 0.5})
        [v] = _verify(V.Score(model, tok, 7), [_item()])
        assert (v.accept, v.score) == (accept, float(best))


def test_the_evaluate_config_builds_score_with_min_score_not_the_embedding_threshold(tok):
    """verifier.threshold (0.85, the cosine) once became int(0.85) = 0 for score: every step passed."""
    from pipelines.config import load_config
    from pipelines.evaluate import build_verifier
    from pipelines.schema import EvaluateConfig

    digits = {d: _first_id(tok, str(d)) for d in range(10)}
    model = ScriptedModel({digits[d]: 0.01 for d in range(10)} | {digits[2]: 0.5})
    cfg = load_config(EvaluateConfig, "evaluate", ["tiny", "verifier.kind=score", "verifier.short_circuit=false"])
    verifier = build_verifier(cfg, model, tok)
    assert cfg.verifier.min_score == 7 and [v.accept for v in _verify(verifier, [_item("a", "b")])] == [False]
    cfg = load_config(EvaluateConfig, "evaluate", ["tiny", "verifier.kind=score", "verifier.min_score=2"])
    assert [v.accept for v in _verify(build_verifier(cfg, model, tok), [_item("a", "b")])] == [True]


def test_judge_asks_with_both_steps_and_compares_aligned_to_unaligned(tok):
    aligned, unaligned = _first_id(tok, "aligned"), _first_id(tok, "unaligned")
    for p_a, p_u, accept in ((0.4, 0.2, True), (0.2, 0.4, False)):
        model = ScriptedModel({aligned: p_a, unaligned: p_u})
        [v] = _verify(V.Judge(model, tok), [_item("y = 4", "x = 3")])
        assert v.accept is accept and v.score == pytest.approx(p_a / (p_a + p_u))
    prompt = tok.decode(model.prompts[0])
    assert "Step A: x = 3" in prompt and "Step B: y = 4" in prompt and prompt.endswith("[")  # the prefilled answer


def test_embedding_accepts_above_the_cosine_threshold_and_exact_matches_skip_the_model(tok):
    encoder = ScriptedEncoder([0.9, 0.85, 0.2])
    got = _verify(V.Embedding(encoder, 0.85), [_item("a", "b"), _item("c", "d"), _item("e", "f")])
    assert [v.accept for v in got] == [True, False, False]  # strictly above
    assert encoder.texts == ["b", "a", "d", "c", "f", "e"]  # (target, draft) pairs
    model = ScriptedModel({})
    wrapped = V.ShortCircuit(V.TBVM(model, tok))
    got = _verify(wrapped, [_item("X = 3", "x=3"), _item("a", "b")])
    assert [v.accept for v in got] == [True, False] and len(model.prompts) == 1  # only the non-match was asked


def test_random_accepts_with_probability_p_reproducibly():
    draws = [v.accept for v in _verify(V.RandomAccept(0.3, seed=1), [_item()] * 2000)]
    again = [v.accept for v in _verify(V.RandomAccept(0.3, seed=1), [_item()] * 2000)]
    assert draws == again and abs(sum(draws) / len(draws) - 0.3) < 0.04
