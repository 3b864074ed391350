# ruff: noqa: F811  (pytest fixtures imported from _align_fixtures are used as arguments)
"""``finetune.mode: grpo`` end to end on a tiny random model dir: the run writes TRL-named metrics and samples,
KL is 0 at the first step (policy == reference) for the frozen copy and for the LoRA base, rollouts are
reproducible from their seeds, and a crash between the iterations of one batch of rollouts resumes exactly."""

import json

import pytest
import torch
from _align_fixtures import keep_torch_threads, model_dir, rows  # noqa: F401

from lmforge.artifacts.model_dir import load_weights
from lmforge.config import ConfigError
from lmforge.tasks.config import config_from_dict
from lmforge.tasks.grpo import RolloutBatches, rollout_seed, rollout_tensors
from lmforge.tasks.run import run as finetune
from lmforge.train.losses import IGNORE

PROMPTS = [{"prompt": f"What is {a} plus {b}?", "answer": str(a + b)} for a in range(4) for b in range(3)] + [
    {"messages": [{"role": "user", "content": "Say hello."}], "answer": "hello"},
    {"messages": [{"role": "user", "content": "What is two plus two?"}], "answer": "4"}]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in PROMPTS), encoding="utf-8")
    return p


def grpo_cfg(model_dir, prompts_file, run_dir, **sections):
    data = {"run": {"dir": str(run_dir)}, "model": {"from": str(model_dir)}, "finetune": {"mode": "grpo"},
            "data": {"train": [str(prompts_file)], "dev_fraction": 0.25, "seq_len": 48},
            "train": {"global_batch": 8, "micro_batch": 4, "max_steps": 4, "device": "cpu", "threads": 1},
            "optim": {"lr": 3e-2}, "schedule": {"name": "constant"},
            "eval": {"interval": 2, "keep_best": False},
            "checkpoint": {"interval": 1},
            "log": {"interval": 1, "progress": False, "peak_tflops": 1.0},
            # a vowel somewhere: a random model gets it sometimes, so groups carry a signal
            "grpo": {"num_generations": 4, "max_completion_length": 6, "beta": 0.04, "num_iterations": 2,
                     "sample_interval": 2, "eval_max_prompts": 3,
                     "rewards": [{"name": "answer"}, {"name": "format", "pattern": "[aeiou]", "weight": 0.5},
                                 {"name": "length", "target_tokens": 3, "weight": 0.1}]}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


def test_rollout_rows_and_seeds():
    tokens, targets = rollout_tensors([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad=0)
    assert tokens.tolist() == [[5, 6, 7, 1, 2], [8, 3, 4, 9, 0]]
    assert targets.tolist() == [[IGNORE, IGNORE, 1, 2, IGNORE], [3, 4, 9, IGNORE, IGNORE]]
    seeds = {rollout_seed(0, s, p, k) for s in range(3) for p in range(3) for k in range(3)}
    assert len(seeds) == 27 and rollout_seed(0, 1, 2, 3) == rollout_seed(0, 1, 2, 3)


def test_grpo_run_writes_trl_metrics_samples_and_a_model(model_dir, prompts_file, tmp_path):
    res = finetune(grpo_cfg(model_dir, prompts_file, tmp_path / "run"))
    train = rows(tmp_path / "run", "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    for key in ("reward", "reward_std", "rewards/answer/mean", "rewards/format/mean", "rewards/length/std",
                "completions/mean_length", "completions/clipped_ratio", "frac_reward_zero_std", "kl",
                "clip_ratio/region_mean"):
        assert key in train[0], key
    assert train[0]["kl"] == 0.0  # the policy is its reference at the first step
    assert train[0]["clip_ratio/region_mean"] == 0.0  # ratio exactly 1 on the rollouts' own step
    assert train[2]["kl"] > 0  # it has moved
    assert train[1]["reward"] == train[0]["reward"]  # num_iterations=2: step 2 reuses step 1's rollouts
    assert train[0]["frac_reward_zero_std"] < 1.0  # some group had a signal: a real gradient
    assert train[0]["grad_norm"] > 0
    ev = rows(tmp_path / "run", "eval")
    assert [r["step"] for r in ev] == [0, 2, 4] and "reward" in ev[0] and "rewards/answer/mean" in ev[0]
    samples = sorted((tmp_path / "run" / "completions").glob("step_*.jsonl"))
    assert [p.name for p in samples] == ["step_000001.jsonl", "step_000003.jsonl"]
    first = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert len(first) == 8 and {"prompt", "answer", "completion", "reward", "rewards", "advantage"} <= set(first[0])
    assert res.model_dir and (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_lora_reference_is_the_base_with_adapters_off(model_dir, prompts_file, tmp_path):
    res = finetune(grpo_cfg(model_dir, prompts_file, tmp_path / "lora", grpo={"lora": True, "num_iterations": 1},
                            lora={"rank": 4, "targets": ["wq", "wv"]}, optim={"lr": 5e-2}))
    train = rows(tmp_path / "lora", "train")
    assert train[0]["kl"] == 0.0 and train[-1]["kl"] > 0
    assert res.trainable_params < res.total_params / 4
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_between_iterations_is_exact(model_dir, prompts_file, tmp_path, monkeypatch):
    straight = finetune(grpo_cfg(model_dir, prompts_file, tmp_path / "a"))
    calls = {"n": 0}
    orig = RolloutBatches.next_batch

    def crash(self):
        calls["n"] += 1
        if calls["n"] == 4:  # after step 3's checkpoint, which holds step 3's rollouts for their second use
            raise RuntimeError("simulated crash")
        return orig(self)

    with monkeypatch.context() as m:
        m.setattr(RolloutBatches, "next_batch", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            finetune(grpo_cfg(model_dir, prompts_file, tmp_path / "b"))
    resumed = finetune(grpo_cfg(model_dir, prompts_file, tmp_path / "b"))
    assert resumed.train.resumed_from and resumed.train.resumed_from.endswith("step_000003")
    a, b = load_weights(straight.model_dir), load_weights(resumed.model_dir)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("loss", "reward", "kl", "clip_ratio/region_mean")
    assert [[r[k] for k in keys] for r in rows(tmp_path / "a", "train")] == \
           [[r[k] for k in keys] for r in rows(tmp_path / "b", "train")]


def test_config_errors(model_dir, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="must exceed grpo.max_completion_length"):
        finetune(grpo_cfg(model_dir, prompts_file, tmp_path / "c", grpo={"max_completion_length": 48}))
    with pytest.raises(ConfigError, match="multiple of grpo.num_generations"):
        grpo_cfg(model_dir, prompts_file, tmp_path / "c", train={"global_batch": 6})


@pytest.mark.slow
def test_grpo_raises_an_easy_reward(model_dir, prompts_file, tmp_path):
    """The loop optimises its reward: completions of a random model that start with a letter a–m earn 1."""
    finetune(grpo_cfg(model_dir, prompts_file, tmp_path / "learn", train={"max_steps": 12, "global_batch": 16,
                                                                           "micro_batch": 16},
                      optim={"lr": 3e-2}, eval={"interval": 0, "at_start": False}, checkpoint={"interval": 0},
                      grpo={"num_generations": 8, "num_iterations": 1, "beta": 0.0, "max_completion_length": 3,
                            "sample_interval": 0, "rewards": [{"name": "format", "pattern": r"^\s*[a-mA-M]"}]}))
    reward = [r["reward"] for r in rows(tmp_path / "learn", "train")]
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3 + 0.25, reward
