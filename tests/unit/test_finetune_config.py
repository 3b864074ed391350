"""The fine-tuning config: shipped recipes load, keys users rely on, defaults that depend on the mode,
and one-line errors naming the key and the fix. No torch work here."""

from pathlib import Path

import pytest

from lmforge.config import ConfigError
from lmforge.tasks.config import config_dict, config_from_dict, load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "lmforge" / "recipes" / "finetune").glob("*.yaml"))


def base(**sections):
    data = {"model": {"from": "runs/x/model"}, "data": {"train": ["train.jsonl"]},
            "train": {"max_steps": 10}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return data


def test_every_shipped_recipe_loads():
    assert {p.stem for p in CONFIGS} >= {"sft", "sft_zh", "lora", "classify", "classify_zh"}
    for path in CONFIGS:
        cfg = load_config(str(path), ["run.dir=/tmp/x"])
        assert cfg.model.path and cfg.data.train, path
        assert cfg.run.dir == "/tmp/x"


def test_keys_users_rely_on_and_overrides():
    cfg = load_config(str(CONFIGS[0].parent / "lora.yaml"),
                      ["model.from=some/dir", "finetune.mode=lora", "lora.rank=4", "lora.alpha=8",
                       "lora.targets=[wq,wk]", "data.train=a.json,b.json", "data.dev=c.json", "data.format=chat",
                       "eval.interval=7", "checkpoint.interval=9", "log.interval=3", "optim.lr=1e-4",
                       "train.max_steps=50", "train.epochs=null"])
    assert cfg.model.path == "some/dir" and cfg.mode == "lora"
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets) == (4, 8.0, ["wq", "wk"])
    assert cfg.data.train == ["a.json", "b.json"] and cfg.data.dev == ["c.json"] and cfg.data.format == "chat"
    assert (cfg.eval.interval, cfg.checkpoint.interval, cfg.log.interval, cfg.optim.lr) == (7, 9, 3, 1e-4)
    assert config_dict(cfg)["model"]["from"] == "some/dir"  # written back as YAML spells it


def test_metric_and_direction_follow_the_mode():
    sft = config_from_dict(base())
    assert (sft.eval.metric, sft.eval.metric_mode, sft.run.dir) == ("val_loss", "min", "runs/finetune")
    clf = config_from_dict(base(finetune={"mode": "classify"}))
    assert (clf.eval.metric, clf.eval.metric_mode) == ("accuracy", "max")
    f1 = config_from_dict(base(finetune={"mode": "classify"}, eval={"metric": "macro_f1"}))
    assert f1.eval.metric_mode == "max"
    loss = config_from_dict(base(finetune={"mode": "classify"}, eval={"metric": "val_loss"}))
    assert loss.eval.metric_mode == "min"
    assert clf.uses_lora is False
    assert config_from_dict(base(finetune={"mode": "classify"}, classify={"method": "lora"})).uses_lora


def test_epochs_become_steps():
    cfg = config_from_dict(base(train={"max_steps": None, "epochs": 2.5, "global_batch": 10}))
    assert cfg.steps_for(95) == 23  # 9 full batches per epoch x 2.5


@pytest.mark.parametrize("data, message", [
    ({"model": {}}, "model.from is not set"),
    ({"model": {"from": "x", "preset": "tiny"}}, "model.preset does not apply"),
    ({"data": {"train": []}}, "data.train is not set"),
    ({"finetune": {"mode": "classify"}, "data": {"format": "alpaca"}}, "data.format=alpaca should be labels"),
    ({"data": {"format": "labels"}}, "data.format=labels is for finetune.mode=classify"),
    ({"finetune": {"mode": "lorra"}}, "did you mean 'lora'"),
    ({"train": {"epochs": 1}}, "exactly one of train.max_steps and train.epochs"),
    ({"train": {"max_tokens": 100, "max_steps": None}}, "train.max_tokens is for pretraining"),
    ({"train": {"global_batch_tokens": 4096}}, "train.global_batch_tokens is for pretraining"),
    ({"train": {"objective": "mlm"}}, "train.objective is for pretraining"),
    ({"train": {"epoch": 2}}, "unknown config key 'train.epoch'; did you mean 'epochs'"),
    ({"eval": {"metric": "accuracy"}}, "measured for finetune.mode=classify and reward only"),
    ({"eval": {"metric": "bleu"}}, "eval.metric=bleu is not one of"),
    ({"eval": {"patience": 2}}, "eval.patience needs periodic evaluation"),
    ({"finetune": {"mode": "lora"}, "lora": {"targets": ["wz"]}}, "lora.targets has unknown 'wz'"),
    ({"finetune": {"mode": "lora"}, "lora": {"rank": 0}}, "lora.rank=0 must be a positive integer"),
    ({"data": {"dev_fraction": 0.0}, "eval": {"keep_best": True}}, "need a dev split"),
    ({"train": {"precision": "fp16"}}, "train.precision='fp16' is not one of 'fp32', 'bf16'"),
    ({"loras": {"rank": 4}}, "did you mean 'lora'"),
])
def test_errors_name_the_key_and_the_fix(data, message):
    merged = base()
    for name, values in data.items():
        if name == "model":
            merged["model"] = values
        else:
            merged.setdefault(name, {}).update(values)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(merged)


def test_cli_reports_config_and_model_errors_in_one_line(tmp_path, capsys):
    from lmforge.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{from: {tmp_path / 'missing'}}}\ndata: {{train: [x.jsonl]}}\ntrain: {{max_steps: 2}}\n"
                   f"run: {{dir: {tmp_path / 'run'}}}\n")
    assert main(["finetune", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "config.json is missing" in err and "\n" not in err
    assert main(["finetune", "--config", str(cfg), "finetune.mode=nope"]) == 2
    assert "finetune.mode='nope' is not one of" in capsys.readouterr().err


@pytest.mark.parametrize("context, explicit, want", [
    (256, None, 256),  # the tiny/small presets: the model's whole context (512 would not fit)
    (8192, None, 2048),  # a long-context model: capped
    (256, 128, 128),  # an explicit value is kept
])
def test_seq_len_defaults_to_the_models_context(tmp_path, context, explicit, want):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model": {"max_seq_len": context, "dim": 64}}))
    data = base(model={"from": str(tmp_path)})
    if explicit is not None:
        data["data"]["seq_len"] = explicit
    cfg = config_from_dict(data)
    assert cfg.data.seq_len == want
    assert config_dict(cfg)["data"]["seq_len"] == want  # the resolved value is what config.yaml records


def test_seq_len_stays_open_without_a_readable_model_dir():
    assert config_from_dict(base()).data.seq_len is None  # the run's model-dir check reports the problem


def test_train_section_has_the_shared_keys_and_epochs_not_pretrainings_keys():
    from dataclasses import fields

    from lmforge.tasks.config import FinetuneTrainConfig
    from lmforge.train.config import StepsConfig, TrainConfig

    shared = {f.name for f in fields(StepsConfig)}
    assert {"global_batch", "micro_batch", "max_steps", "seed", "resume", "precision", "z_loss"} <= shared
    assert {f.name for f in fields(FinetuneTrainConfig)} == shared | {"epochs"}
    assert {f.name for f in fields(TrainConfig)} == shared | {"global_batch_tokens", "max_tokens", "objective"}
    train = config_from_dict(base()).train
    assert (train.global_batch, train.micro_batch) == (32, 8)  # fine-tuning's own defaults
    assert not hasattr(train, "objective") and "objective" not in config_dict(config_from_dict(base()))["train"]


def test_a_config_yaml_written_before_the_train_sections_split_still_loads(tmp_path):
    """Fine-tuning runs' config.yaml spelled out pretraining's train keys at their idle values."""
    old = base(train={"global_batch_tokens": None, "max_tokens": None, "objective": "clm", "epochs": None})
    cfg = config_from_dict(old)
    assert cfg.train.max_steps == 10 and cfg.train.global_batch == 32
