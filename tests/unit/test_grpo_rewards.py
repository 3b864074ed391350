"""GRPO reward functions (`lmforge.tasks.grpo_rewards`), the prompt reader (`lmforge.data.prompts`) and the
``grpo:`` config checks."""

from __future__ import annotations

import json

import pytest

from lmforge.config import ConfigError
from lmforge.data.prompts import load_prompts
from lmforge.data.records import DataError
from lmforge.tasks.config import RewardSpec, config_from_dict
from lmforge.tasks.grpo_rewards import (
    answer_matches,
    boxed,
    build_rewards,
    extract_answer,
    last_number,
    load_user_function,
    score,
)


def test_answer_extraction():
    assert boxed(r"so \boxed{\frac{1}{2}} and \boxed{42}.") == "42"
    assert boxed(r"\boxed{\frac{1}{2}}") == r"\frac{1}{2}"
    assert boxed(r"\boxed{3") is None
    assert last_number("a 3, then 1,234.5 and -7 apples") == -7.0
    assert last_number("the total is 1,234.5") == 1234.5
    assert last_number("none") is None
    assert extract_answer(r"x = \boxed{12}") == 12.0
    assert extract_answer("Paris.", "exact") == "Paris."


@pytest.mark.parametrize("completion,answer,mode,ok", [
    ("3 + 4 = 7", "7", "auto", True),
    ("3 + 4 = 7.0000001", 7, "auto", True),
    ("I think 8", "7", "auto", False),
    (r"first 7, then \boxed{8}", "8", "auto", True),
    (r"first 8, then \boxed{7}", "8", "auto", False),
    ("answer: 1,000", "1000", "numeric", True),
    ("  Paris. ", "paris", "auto", True),
    ("Paris is nice", "paris", "exact", False),
    (r"\boxed{Paris}", "paris", "exact", True),
    ("no number", "5", "numeric", False),
    ("5", None, "auto", False),
])
def test_answer_matches(completion, answer, mode, ok):
    assert answer_matches(completion, answer, mode) is ok


def test_builtins_weighted_sum_and_names(tmp_path):
    specs = [RewardSpec(name="answer"), RewardSpec(name="format", pattern=r"^<a>.*</a>$", weight=0.5),
             RewardSpec(name="length", target_tokens=2, weight=2.0), RewardSpec(name="answer", mode="exact")]
    rewards = build_rewards(specs, max_completion_length=10)
    assert [r.name for r in rewards] == ["answer", "format", "length", "answer_2"]
    total, per = score(rewards, ["p", "p"], ["<a>7</a>", "8"], ["7", "7"], [[1, 2, 3, 4], [1]])
    assert per == {"answer": [1.0, 0.0], "format": [1.0, 0.0], "length": [-0.2, -0.0], "answer_2": [0.0, 0.0]}
    assert total == pytest.approx([1.0 + 0.5 - 0.4, 0.0])


def test_user_function_from_a_file(tmp_path, monkeypatch):
    f = tmp_path / "my_rewards.py"
    f.write_text("def shorter(prompts, completions, answer, **kw):\n"
                 "    return [None if a is None else -len(c) for c, a in zip(completions, answer)]\n"
                 "def bad(prompts, completions, **kw):\n    return ['x'] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    rewards = build_rewards([RewardSpec(name="python", function="my_rewards.py:shorter", weight=0.1)], 8)
    total, per = score(rewards, ["p", "p"], ["abc", "ab"], [None, "1"], [[1], [2]])
    assert per == {"shorter": [None, -2.0]} and total == pytest.approx([0.0, -0.2])  # None adds nothing
    with pytest.raises(ValueError, match="reward 'bad' returned 'x'"):
        score(build_rewards([RewardSpec(name="python", function="my_rewards.py:bad")], 8), ["p"], ["c"], [None],
              [[1]])
    with pytest.raises(ConfigError, match="no file"):
        load_user_function("missing.py:f")
    with pytest.raises(ConfigError, match="has no function nope"):
        load_user_function("my_rewards.py:nope")
    with pytest.raises(ConfigError, match="FILE.py:NAME"):
        load_user_function("my_rewards.py")
    with pytest.raises(ConfigError, match="FILE.py:NAME"):
        load_user_function("json:dumps")  # a file path only: what runs is the file the config names


def test_format_pattern_is_checked():
    with pytest.raises(ConfigError, match="not a valid regex"):
        build_rewards([RewardSpec(name="format", pattern="(")], 8)


def test_prompt_records(tmp_path):
    f = tmp_path / "p.jsonl"
    rows = [{"prompt": "2+2=", "answer": 4}, {"messages": [{"role": "user", "content": "3+3?"},
                                                          {"role": "assistant", "content": "6"}], "answer": "6"},
            {"question": "1+1", "answer": "2"}]
    f.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    ex = load_prompts(f)
    assert ex[0].prompt == "2+2=" and ex[0].answer == 4
    assert ex[1].messages == [{"role": "user", "content": "3+3?"}] and ex[1].text() == "3+3?"
    g = tmp_path / "q.jsonl"
    g.write_text(json.dumps(rows[2]) + "\n")
    with pytest.raises(DataError, match="q.jsonl:1: a prompt record needs 'prompt' or 'messages'"):
        load_prompts(g)
    assert load_prompts(g, columns={"prompt": "question"})[0].prompt == "1+1"


def _cfg(**grpo):
    return {"model": {"from": "m"}, "finetune": {"mode": "grpo"}, "data": {"train": ["t.jsonl"], "seq_len": 64},
            "train": {"max_steps": 2, "global_batch": 8, "micro_batch": 4}, "grpo": grpo}


def test_config_section():
    cfg = config_from_dict(_cfg(num_generations=4, rewards=[{"name": "answer", "weight": 2}]))
    assert cfg.grpo.rewards[0].weight == 2.0 and cfg.eval.metric == "reward" and cfg.eval.metric_mode == "max"
    assert not cfg.uses_lora and config_from_dict(_cfg(lora=True)).uses_lora
    for bad, msg in [({"num_generations": 3}, "multiple of grpo.num_generations"),
                     ({"num_generations": 1}, "at least 2"),
                     ({"rewards": [{"name": "format"}]}, "needs pattern"),
                     ({"rewards": [{"name": "python"}]}, "needs function"),
                     ({"rewards": [{"name": "bleu"}]}, "is not one of"),
                     ({"loss_type": "dapo"}, "is not one of"),
                     ({"temperature": 0}, "must be positive")]:
        with pytest.raises(ConfigError, match=msg):
            config_from_dict(_cfg(**bad))
