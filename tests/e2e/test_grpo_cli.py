"""`lmforge finetune` with ``finetune.mode: grpo`` through the CLI on a tiny model dir: a YAML config with a
user reward function from a file (the trust model: the user's own code, named by path), the --json payload,
RUN/model, metrics.jsonl with TRL's names; a bad reward reference is one error line with exit code 2."""

import json

import pytest
import torch

from lmforge.cli import main

PROMPTS = [{"prompt": f"{a} + {b} =", "answer": str(a + b)} for a in range(5) for b in range(4)]
REWARD_FILE = """
def ends_with_digit(prompts, completions, answer, **kwargs):
    return [1.0 if c.strip()[-1:].isdigit() else 0.0 for c in completions]
"""


@pytest.fixture(autouse=True)
def keep_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def setup(tmp_path, make_tokenizer, monkeypatch):
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model

    make_tokenizer(tmp_path, [f"{a} + {b} = {a + b}" for a in range(10) for b in range(10)] * 3, 300, "tok")
    cfg = ModelConfig(vocab_size=320, dim=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=64)
    save_model_dir(build_model(cfg, seed=0), tmp_path / "base", tokenizer_dir=str(tmp_path / "tok"))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PROMPTS))
    (tmp_path / "my_rewards.py").write_text(REWARD_FILE)
    (tmp_path / "grpo.yaml").write_text(f"""
model: {{from: {tmp_path / "base"}}}
finetune: {{mode: grpo}}
data: {{train: [{tmp_path / "prompts.jsonl"}], dev_fraction: 0.2, seq_len: 32}}
train: {{global_batch: 8, micro_batch: 8, max_steps: 3, threads: 1}}
optim: {{lr: 0.01}}
eval: {{interval: 3, keep_best: false}}
checkpoint: {{interval: 0}}
log: {{interval: 1, progress: false}}
grpo:
  num_generations: 4
  max_completion_length: 4
  loss_type: dr_grpo
  scale_rewards: false
  rewards:
    - {{name: answer}}
    - {{name: python, function: my_rewards.py:ends_with_digit, weight: 0.5}}
""")
    monkeypatch.chdir(tmp_path)  # the reward file's path is relative to the working directory
    return tmp_path


def test_grpo_cli_run(setup, capsys):
    run = setup / "run"
    rc = main(["finetune", "--config", str(setup / "grpo.yaml"), f"run.dir={run}", "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    payload = json.loads(out.strip().splitlines()[-1])
    assert payload["mode"] == "grpo" and payload["step"] == 3 and payload["stop_reason"] == "max_steps"
    assert payload["model_dir"] and (run / "model" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert len(train) == 3 and all("rewards/ends_with_digit/mean" in r and "reward" in r for r in train)
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals and "rewards/answer/mean" in evals[-1] and "reward" in payload["val"]
    assert not (run / "completions").exists()  # grpo.sample_interval (10) > the run's 3 steps


def test_grpo_cli_bad_reward_is_one_line(setup, capsys):
    rc = main(["finetune", "--config", str(setup / "grpo.yaml"), f"run.dir={setup / 'bad'}",
               "grpo.rewards=[{name: python, function: missing.py:f}]"])
    _, err = capsys.readouterr()
    assert rc == 2
    assert err.strip().splitlines()[-1].startswith("error: grpo.rewards: function='missing.py:f': no file")
