"""The packaged real model, its early-exit draft and the MoE built from it."""

import pytest
import torch

from actors import zoo
from actors.engine import Engine, Request, Speculation
from quant.perplexity import perplexity, pydoc_text
from tests.conftest import hf_greedy


def test_smollm2_engine_matches_transformers_and_sd_is_lossless(smollm, chat_prompt):
    model, tok = smollm
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    want = hf_greedy(model, chat_prompt, 40)
    [plain] = Engine(model, tok).generate([Request(chat_prompt, max_new_tokens=40)])
    assert plain.token_ids == want[:len(plain.token_ids)]
    assert plain.finish_reason == ("eos" if len(plain.token_ids) < 40 else "length")
    draft, _ = zoo.load_model("smollm2-135m-draft-l6", device="cpu")
    assert draft.config.num_hidden_layers == 6 and len(draft.model.layers) == 6
    for spec, drafter in ((Speculation("draft", 4), draft), (Speculation("ngram", 3), None)):
        [res] = Engine(model, tok, draft_model=drafter, speculation=spec).generate(
            [Request(chat_prompt, max_new_tokens=40)])
        assert res.token_ids == plain.token_ids, spec


def test_steps_stop_at_the_delimiter(smollm, chat_prompt):
    model, tok = smollm
    engine = Engine(model, tok)
    prefixes = [chat_prompt + tok(s).input_ids for s in ["Step 1:", "First,", "We"]]
    results = engine.generate([Request(p, max_new_tokens=40, stop=("\n\n",)) for p in prefixes])
    for p, r in zip(prefixes, results):
        assert r.token_ids == hf_greedy(model, p, len(r.token_ids))
        if r.finish_reason == "stop":
            assert r.text.endswith("\n\n") or "\n\n" in tok.decode(r.token_ids[-1:])
            assert "\n\n" not in tok.decode(r.token_ids[:-1])


def test_moe_with_every_expert_active_reproduces_the_dense_model(smollm):
    dense, tok = smollm
    moe, _ = zoo.load_model("smollm2-moe-8x-top8", device="cpu")
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert moe.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 2 * 192, 576)
    ids = tok(pydoc_text()[:3000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        a, b = dense(ids).logits, moe(ids).logits
    # router weights are uniform to ~1e-4, so the MoE sums the same neurons as the dense MLP
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() == 1.0
    assert (a - b)[:, 1:].abs().max() < 0.1  # the first token has outlier activations: looser there
    text = tok(pydoc_text(), return_tensors="pt").input_ids[0, -1024:]
    assert perplexity(moe, text, 512) == pytest.approx(perplexity(dense, text, 512), rel=1e-3)


def test_demo_moe_routes_top6_and_runs_in_the_engine(smollm, chat_prompt):
    moe, tok = zoo.load_model("smollm2-moe-8x", device="cpu")
    assert moe.config.num_local_experts == 8 and moe.config.num_experts_per_tok == 6
    want = hf_greedy(moe, chat_prompt, 16)
    [res] = Engine(moe, tok).generate([Request(chat_prompt, max_new_tokens=16)])
    assert res.token_ids == want[:len(res.token_ids)]


def test_unknown_models_are_clear_errors():
    with pytest.raises(zoo.ModelNotFound, match="unknown model"):
        zoo.resolve_dir("smollm3-7b")
    with pytest.raises(zoo.ModelNotFound, match="does not exist"):
        zoo.resolve_dir("./no/such/dir")
    with pytest.raises(zoo.ModelNotFound, match="has 2"):
        zoo.load_model("tiny-llama-draft-l5")


def test_perplexity_protocols(tiny_llama):
    model, tok = tiny_llama
    ids = tok(pydoc_text()[:4000], return_tensors="pt").input_ids[0, :300]
    flat = perplexity(model, ids, window=300)
    assert perplexity(model, ids, window=300, protocol="sliding", stride=100) == pytest.approx(flat, rel=1e-4)
    chunked = perplexity(model, ids, window=100)
    assert chunked != pytest.approx(flat, rel=1e-6)  # less context per token
    with pytest.raises(ValueError, match="protocol"):
        perplexity(model, ids, protocol="strided")
