"""The Trainer core with an in-memory batch source (no data files): loss goes down, accumulation is
exact, non-finite steps are skipped, divergence stops with a checkpoint, early stopping, time limits,
and an interrupted run resumes bit-identically."""

import json
import math

import pytest
import torch

from lmforge.artifacts.model_dir import load_model_dir
from lmforge.config import from_dict
from lmforge.models.transformer import build_model
from lmforge.train.config import PretrainConfig
from lmforge.train.trainer import Job, Trainer, TrainingDiverged, causal_lm_loss, find_resume

VOCAB, T = 64, 16


class CountingSource:
    """Rows of consecutive tokens (mod VOCAB) from a seeded random start: learnable, resumable."""

    def __init__(self, rows=8, seed=0, fail_at=None):
        self.rows, self.seed, self.i, self.fail_at = rows, seed, 0, fail_at

    def next_batch(self):
        if self.fail_at is not None and self.i == self.fail_at:
            raise RuntimeError("simulated crash")
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.i)
        self.i += 1
        start = torch.randint(0, VOCAB, (self.rows, 1), generator=g)
        return (start + torch.arange(T + 1)) % VOCAB

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def val_batches():
    src = CountingSource(rows=4, seed=12345)
    return [src.next_batch() for _ in range(2)]


def make_cfg(run_dir, **sections):
    data = {
        "run": {"dir": str(run_dir)},
        "model": {"preset": "tiny", "vocab_size": VOCAB, "dim": 32, "n_heads": 2, "n_kv_heads": 1,
                  "ffn_hidden": 64, "max_seq_len": T},
        "data": {"dir": "unused", "seq_len": T},
        "train": {"global_batch": 8, "micro_batch": 4, "max_steps": 12},
        "optim": {"lr": 1e-2, "weight_decay": 0.0},
        "schedule": {"name": "constant"},
        "eval": {"interval": 0, "batches": 2},
        "checkpoint": {"interval": 0},
        "log": {"interval": 1, "peak_tflops": 1.0, "progress": False},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return from_dict(PretrainConfig, data)


def make_trainer(cfg, source=None, loss_fn=causal_lm_loss, seed=0):
    model = build_model(cfg.model_config(), seed=seed)
    job = Job(model, source or CountingSource(), cfg.train.max_steps, loss_fn, val_batches,
              math_fields={"model.dim": 32}, flops_per_token=cfg.model_config().flops_per_token(T),
              bytes_per_token=2.0)
    return Trainer(cfg, job, resume_from=find_resume(cfg.run.dir, cfg.train.resume))


def rows(run_dir, kind="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_training_lowers_val_loss_and_writes_the_run_dir(tmp_path):
    cfg = make_cfg(tmp_path, train={"max_steps": 30})
    result = make_trainer(cfg).fit()
    evals = rows(tmp_path, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0, evals
    assert evals[-1]["val_bpb"] == pytest.approx(evals[-1]["val_loss"] / math.log(2) / 2.0)
    train = rows(tmp_path)
    assert [r["step"] for r in train] == list(range(1, 31))
    for key in ("tokens", "loss", "lr", "grad_norm", "tok_per_s", "mfu", "step_time", "mem_gb", "peak_mem_gb"):
        assert key in train[-1], key
    assert train[-1]["tokens"] == 30 * 8 * T and result.tokens == 30 * 8 * T
    assert result.stop_reason == "max_steps" and result.step == 30
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step_000030"
    model = load_model_dir(tmp_path / "model")
    x = CountingSource(rows=2, seed=7).next_batch()
    loss, n = causal_lm_loss(model, x)
    assert float(loss.detach() / n) == pytest.approx(evals[-1]["val_loss"], abs=0.5)


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    losses = []
    weights = []
    for micro in (8, 2):
        # optim.eps 1e-6: AdamW's lr·g/(|g|+eps) turns an fp32 rounding difference in a ~1e-9 gradient
        # (summation order differs between 1 and 4 micro-batches) into a ~1e-5 weight difference at eps 1e-8
        cfg = make_cfg(tmp_path / f"m{micro}", train={"micro_batch": micro, "max_steps": 3},
                       eval={"at_start": False, "batches": 0}, optim={"eps": 1e-6})
        make_trainer(cfg).fit()
        losses.append([r["loss"] for r in rows(tmp_path / f"m{micro}")])
        weights.append(load_model_dir(tmp_path / f"m{micro}" / "model").state_dict())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for k in weights[0]:
        torch.testing.assert_close(weights[0][k], weights[1][k], rtol=1e-4, atol=1e-5)


def test_nonfinite_step_is_skipped_and_counted(tmp_path):
    calls = {"n": 0}

    def flaky_loss(model, batch):
        loss, n = causal_lm_loss(model, batch)
        calls["n"] += 1
        if model.training and calls["n"] in (5, 6):  # both micro-batches of step 3
            loss = loss * float("nan")
        return loss, n

    cfg = make_cfg(tmp_path, train={"max_steps": 5}, eval={"batches": 0})
    trainer = make_trainer(cfg, loss_fn=flaky_loss)
    snapshots = []
    orig_step = trainer.train_step

    def recording_step(batch):
        out = orig_step(batch)
        snapshots.append(trainer.raw_model.layers[0].attention.wq.weight.detach().clone())
        return out

    trainer.train_step = recording_step
    result = trainer.fit()
    assert result.nonfinite_total == 1 and result.step == 5
    assert torch.equal(snapshots[1], snapshots[2])  # step 3 made no update
    assert not torch.equal(snapshots[2], snapshots[3])  # training went on
    events = rows(tmp_path, "event")
    assert [e["step"] for e in events if e["event"] == "nonfinite"] == [3]
    assert rows(tmp_path)[2]["skipped"] == 1


def test_divergence_stops_with_a_checkpoint_of_the_last_good_weights(tmp_path):
    calls = {"steps": 0}

    def diverging(model, batch):
        loss, n = causal_lm_loss(model, batch)
        return (loss * float("inf") if calls["steps"] >= 2 else loss), n

    cfg = make_cfg(tmp_path, train={"max_steps": 20, "max_nonfinite": 3}, eval={"batches": 0})
    trainer = make_trainer(cfg, loss_fn=diverging)
    orig = trainer.train_step

    def counting(batch):
        out = orig(batch)
        calls["steps"] += 1
        if calls["steps"] == 2:
            counting.good = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
        return out

    trainer.train_step = counting
    with pytest.raises(TrainingDiverged, match="3 non-finite steps in a row at step 5"):
        trainer.fit()
    latest = (tmp_path / "checkpoints" / "LATEST").read_text().strip()
    assert latest == "step_000005"
    fresh = make_trainer(cfg)
    fresh.ckpt.load(tmp_path / "checkpoints" / latest, fresh.model, fresh.optimizer)
    for k, v in counting.good.items():
        assert torch.equal(fresh.raw_model.state_dict()[k], v), k


def test_early_stopping_with_patience(tmp_path):
    cfg = make_cfg(tmp_path, train={"max_steps": 20}, eval={"interval": 2, "patience": 2, "at_start": False})
    trainer = make_trainer(cfg)
    scripted = iter([5.0, 4.0, 4.5, 3.99, 4.2, 4.3, 1.0])
    trainer.evaluate = lambda: {"val_loss": next(scripted), "val_ppl": 1.0}
    result = trainer.fit()
    assert result.stop_reason == "early_stop" and result.step == 12  # 4.0 at step 4 then no gain >0 twice
    assert result.best_val_loss == 3.99
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step_000012"


def test_time_limit_checkpoints_and_a_rerun_continues(tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    make_trainer(make_cfg(ref_dir, train={"max_steps": 6}, eval={"batches": 0})).fit()
    cfg = make_cfg(run_dir, train={"max_steps": 6, "time_limit_minutes": 1e-9}, eval={"batches": 0})
    first = make_trainer(cfg).fit()
    assert first.stop_reason == "time_limit" and first.step == 1
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_000001"
    cfg = make_cfg(run_dir, train={"max_steps": 6}, eval={"batches": 0})
    source = CountingSource()
    second = make_trainer(cfg, source=source, seed=123).fit()  # another init: only the checkpoint can match
    assert second.resumed_from.endswith("step_000001") and second.step == 6 and second.stop_reason == "max_steps"
    assert second.tokens == 6 * 8 * T
    assert source.i == 6  # the loader went on from the checkpoint's position: batches 1..5, not 0..4
    # the rerun continued the very same run: the uninterrupted run's losses (exactly) and weights
    ref, got = rows(ref_dir), rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, 7))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    a, b = load_model_dir(ref_dir / "model").state_dict(), load_model_dir(run_dir / "model").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_interrupted_run_resumes_bit_identically(tmp_path):
    sections = {"model": {"dropout": 0.1}, "train": {"max_steps": 12}, "checkpoint": {"interval": 3},
                "eval": {"interval": 4}}
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    make_trainer(make_cfg(ref_dir, **sections)).fit()
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(make_cfg(run_dir, **sections), source=CountingSource(fail_at=8)).fit()
    assert (run_dir / "checkpoints" / "LATEST").read_text().strip() == "step_000006"
    result = make_trainer(make_cfg(run_dir, **sections), seed=123).fit()  # init seed is irrelevant on resume
    assert result.resumed_from.endswith("step_000006")
    ref, got = rows(ref_dir), rows(run_dir)
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]  # exact, not approx
    assert [r["val_loss"] for r in rows(run_dir, "eval")] == [r["val_loss"] for r in rows(ref_dir, "eval")]
    a, b = load_model_dir(ref_dir / "model").state_dict(), load_model_dir(run_dir / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_checkpoints_and_stops_cleanly(tmp_path):
    import os
    import signal

    class Terminating(CountingSource):
        def next_batch(self):
            if self.i == 4:
                os.kill(os.getpid(), signal.SIGTERM)  # e.g. a preempted cluster job
            return super().next_batch()

    cfg = make_cfg(tmp_path, train={"max_steps": 10}, eval={"batches": 0})
    before = signal.getsignal(signal.SIGTERM)
    result = make_trainer(cfg, source=Terminating()).fit()
    assert result.stop_reason == "signal" and result.step == 5
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step_000005"
    assert signal.getsignal(signal.SIGTERM) is before  # fit()'s handler is removed, the previous one restored
