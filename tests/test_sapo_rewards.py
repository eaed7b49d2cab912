import asyncio

import pytest

from rewards.sapo import (RewardConfigError, align_score, length_reward, offline_align, outcome_reward, split_steps,
                          step_length_reward)
from rewards.verifiers import Exact


def test_steps_lengths_and_outcome():
    assert split_steps("a\n\nb\n\nc", "\n\n") == ["a\n\n", "b\n\n", "c"]
    assert split_steps("a\n\n", "\n\n") == ["a\n\n"]
    # a blank step (an extra delimiter) is no step: it joins its neighbour and the steps still spell the text
    assert split_steps("a\n\n\n\n\n\nb", "\n\n") == ["a\n\n\n\n\n\n", "b"]
    assert split_steps("\n\n \n\na\n\n", "\n\n") == ["\n\n \n\na\n\n"]
    assert split_steps("\n\n", "\n\n") == [] and split_steps("", "\n\n") == []
    assert length_reward(50, 100) == 1.0 and length_reward(200, 100) == 0.5 and length_reward(0, 10) == 0.0
    assert outcome_reward("so \\boxed{42}", "42") == 1.0 and outcome_reward("41", "42") == 0.0
    assert outcome_reward("42", None) == 0.0
    # step form: mean tokens per step against the target's (20 tokens per step)
    assert step_length_reward(48, 3, 20.0) == 1.0  # 16 per step: shorter steps are not penalised
    assert step_length_reward(48, 1, 20.0) == pytest.approx(20 / 48)  # one long (cut) step
    assert step_length_reward(0, 0, 20.0) == 0.0 and step_length_reward(10, 0, 20.0) == 0.0


def test_alignment_forms():
    assert align_score([True, False, True], "share") == pytest.approx(2 / 3)
    assert align_score([True, False, True], "prefix") == pytest.approx(1 / 3)
    with pytest.raises(RewardConfigError, match="form"):
        align_score([True], "median")


def test_offline_alignment_against_the_cached_trajectory():
    target = ["Add 2 and 3.\n\n", "That is 5.\n\n", "\\boxed{5}"]
    rollouts = ["add 2 and 3.\n\nThat is 5.\n\n\\boxed{5}", "Add 2 and 3.\n\nThat is 6.\n\n\\boxed{5}", "5"]
    got = asyncio.run(offline_align(Exact("normalized"), "2+3?", rollouts, target, "\n\n"))
    assert got == [1.0, pytest.approx(2 / 3), 0.0]
    got = asyncio.run(offline_align(Exact("normalized"), "2+3?", rollouts, target, "\n\n", form="prefix"))
    assert got == [1.0, pytest.approx(1 / 3), 0.0]
    # blank steps earn nothing (they once matched a trajectory's missing step as ""), and a step past the
    # trajectory's end is rejected: one matching step and four blank ones, one matching and one extra step
    got = asyncio.run(offline_align(Exact("normalized"), "2+3?", ["Add 2 and 3.\n\n" + "\n\n" * 4, "\n\n\n\n",
                                                                   "Add 2 and 3.\n\nThat is 5.\n\n\\boxed{5}\n\nmore"],
                                    target, "\n\n"))
    assert got == [1.0, 0.0, pytest.approx(3 / 4)]


def test_online_alignment_asks_the_target_once_per_group(tiny_llama):
    from actors.engine import Engine, Request
    from actors.hosts import EngineHost
    from rewards.sapo import online_align
    from speculative.clients import HostClient

    model, tok = tiny_llama
    host = EngineHost.from_engine(Engine(model, tok))
    calls = []

    class Counting(HostClient):
        async def generate(self, requests):
            calls.append(len(requests))
            return await super().generate(requests)

    prompt = tok("Add 2 and 3.").input_ids
    # the target's own greedy steps are, by definition, aligned with themselves
    own = host.engine.generate([Request(prompt, max_new_tokens=6, stop=("\n\n",))])[0].text
    got = asyncio.run(online_align(Exact("text"), Counting(host), tok, "q", prompt, [own, "zzz unrelated"],
                                   "\n\n", 6))
    assert got[0] == 1.0 and got[1] == 0.0
    assert calls == [2]  # one batched call: one step per rollout step
