import pytest

from lmforge.config import ConfigError
from lmforge.train.config import grad_accum_steps, load_config

BASE = {
    "model": {"preset": "tiny"},
    "data": {"dir": "shards", "seq_len": 64},
    "train": {"global_batch": 8, "micro_batch": 4, "max_steps": 10},
}


def test_defaults_and_run_dir_from_the_file_name(tmp_path):
    path = tmp_path / "mini.yaml"
    path.write_text("model: {preset: tiny}\ndata: {dir: shards, seq_len: 64}\n"
                    "train: {global_batch: 8, micro_batch: 4, max_steps: 10}\n")
    cfg = load_config(str(path), ["optim.lr=1e-3", "schedule.name=wsd"])
    assert cfg.run.dir == "runs/mini" and cfg.run.name == "mini"
    assert cfg.optim.lr == 1e-3 and cfg.schedule.name == "wsd"
    assert cfg.train.resume == "auto" and cfg.model_config().dim == 128


@pytest.mark.parametrize("override, message", [
    (["optim.lrr=1"], r"unknown config key 'optim.lrr'.*did you mean 'lr'"),
    (["trian.max_steps=3"], r"unknown config key 'trian'.*did you mean 'train'"),
    (["train.micro_batch=abc"], r"train.micro_batch='abc' must be an integer"),
    (["schedule.name=cosin"], r"schedule.name='cosin' is not one of.*did you mean 'cosine'"),
    (["train.max_tokens=1000"], r"exactly one of train.max_steps and train.max_tokens"),
    (["schedule.warmup_steps=50"], r"schedule.warmup_steps=50 exceeds the run's 10 steps"),
    (["data.dir="], r"data.dir is not set"),
    (["model.preset=nope"], r"unknown model preset 'nope'"),
    (["model.dim=130"], r"model.dim=130 is not divisible by model.n_heads=4"),
    (["eval.patience=3"], r"eval.patience needs periodic evaluation"),
    (["train.resume=/no/such/ckpt"], r"train.resume='/no/such/ckpt' is neither auto, never nor"),
    (["model.preset=bert-base"], r"pretraining needs a causal LM"),
    (["optim.betas=[0.9]"], r"optim.betas=\[0.9\] must be two numbers"),
    (["train.precision=fp16"], r"train.precision='fp16' is not one of 'fp32', 'bf16'"),  # at validation
])
def test_bad_configs_fail_before_any_work_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override, base=BASE)


def test_global_batch_in_tokens():
    cfg = load_config(None, ["train.global_batch=null", "train.global_batch_tokens=512"], base=BASE)
    assert cfg.global_batch_size == 8
    with pytest.raises(ConfigError, match="global_batch_tokens=500 is not a positive multiple of data.seq_len=64"):
        load_config(None, ["train.global_batch=null", "train.global_batch_tokens=500"], base=BASE)


def test_max_tokens_becomes_steps():
    cfg = load_config(None, ["train.max_steps=null", "train.max_tokens=5000"], base=BASE)
    assert cfg.steps_for() == 10  # ceil(5000 / (8 × 64))


def test_grad_accumulation_is_derived():
    assert grad_accum_steps(64, 8, 2) == 4
    assert grad_accum_steps(8, 8, 1) == 1
    with pytest.raises(ConfigError, match=r"global_batch=60 is not divisible by train.micro_batch=8 × 2 ranks; "
                                          r"try train.global_batch=64"):
        grad_accum_steps(60, 8, 2)


def test_precision_auto_is_bf16_on_cuda_and_fp32_elsewhere():
    import torch

    from lmforge.train.config import TrainConfig, resolve_precision

    assert TrainConfig().precision == "auto"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "bf16"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp32", torch.device("cuda", 0)) == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
