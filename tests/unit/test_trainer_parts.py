"""The Trainer's named parts: accounting (tokens processed vs loss tokens), the throughput meter,
finite-only checkpoints, per-dp-rank RNG, unbiased capped evaluation, print-once helpers, finite optim
values in the config."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from test_trainer import CountingSource, make_cfg, make_trainer, rows

from lmforge.config import ConfigError, UserError
from lmforge.train.trainer import TrainingDiverged, causal_lm_loss, input_tokens, seed_rank_stream


def test_input_tokens_counts_what_the_forward_pass_processes():
    assert input_tokens(torch.zeros(4, 17, dtype=torch.long)) == 4 * 16  # causal rows: T+1 -> T inputs
    assert input_tokens({"tokens": torch.zeros(2, 9, dtype=torch.long), "mask": None}) == 2 * 8
    sft = {"tokens": torch.zeros(2, 8, dtype=torch.long), "labels": torch.full((2, 8), -100),
           "input_tokens": torch.tensor([5, 3])}
    assert input_tokens(sft) == 8  # padding excluded
    assert input_tokens({"tokens": torch.zeros(3, 8), "lengths": torch.tensor([1, 2, 8])}) == 11


def test_sft_loss_tokens_are_reported_beside_tokens_processed(tmp_path):
    """Only half of each row is a target (as SFT's assistant tokens): tok/s counts inputs, not targets."""

    def half_targets(model, batch):
        labels = batch.clone()
        labels[:, :9] = -100  # targets are labels[:, 1:]: 8 of 16 ignored
        return causal_lm_loss(model, {"tokens": batch, "labels": labels})

    cfg = make_cfg(tmp_path, train={"max_steps": 3}, eval={"batches": 0})
    result = make_trainer(cfg, loss_fn=half_targets).fit()
    last = rows(tmp_path)[-1]
    inputs_per_step, targets_per_step = 8 * 16, 8 * 8  # 8 rows of 17 tokens -> 16 inputs, targets 9..16
    assert last["tokens"] == result.tokens == 3 * inputs_per_step
    assert last["loss_tokens"] == result.loss_tokens == 3 * targets_per_step
    assert last["tok_per_s"] == pytest.approx(2 * last["loss_tok_per_s"], rel=1e-6)
    assert last["mfu"] == pytest.approx(last["tok_per_s"] * cfg.model_config().flops_per_token(16) / 1e12)


def test_throughput_meter_windows_and_median():
    from lmforge.train.metrics import ThroughputMeter

    m = ThroughputMeter(flops_per_token=10.0, peak_flops=1000.0, n_devices=2)
    m.add(1.0, {"loss": 2.0, "grad_norm": 1.0, "finite": True, "tokens": 100, "loss_tokens": 10})
    m.add(1.0, {"loss": float("nan"), "grad_norm": 1.0, "finite": False, "tokens": 100, "loss_tokens": 10})
    row = m.close_window({"loss": float("nan"), "grad_norm": 1.0})
    assert row["loss"] == 2.0 and row["skipped"] == 1 and row["tok_per_s"] == 100.0
    assert row["loss_tok_per_s"] == 10.0 and row["mfu"] == pytest.approx(100.0 * 10.0 / 2000.0)
    m.add(1.0, {"loss": 1.0, "grad_norm": 1.0, "finite": True, "tokens": 300, "loss_tokens": 30})
    m.close_window({})
    m.add(1.0, {"loss": 1.0, "grad_norm": 1.0, "finite": True, "tokens": 200, "loss_tokens": 30})
    m.close_window({})
    assert m.median_tok_per_s() == 200.0


def test_nonfinite_weights_are_never_checkpointed_nor_called_good(tmp_path):
    """A huge learning rate makes the weights inf/NaN after one update: no checkpoint of them, no model,
    and the message points at the last finite checkpoint instead of calling them good."""
    cfg = make_cfg(tmp_path, train={"max_steps": 20, "max_nonfinite": 2}, eval={"batches": 0},
                   checkpoint={"interval": 1}, optim={"lr": 1e-3, "grad_clip": 0.0})
    trainer = make_trainer(cfg)
    schedule = trainer.schedule

    class SaneThenHuge:  # two sane steps first (checkpointed), then the huge rate
        def __call__(self, step):
            return 1e-3 if step < 2 else 1e300  # overflows fp32 weights to inf

        def state_dict(self):
            return schedule.state_dict()

    trainer.schedule = SaneThenHuge()
    with pytest.raises(TrainingDiverged) as info:
        trainer.fit()
    msg = str(info.value)
    assert "no longer finite" in msg and "step_000002" in msg and "last good" not in msg, msg
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step_000002"
    assert not (tmp_path / "model").exists()
    from lmforge.train.checkpoint import list_checkpoints

    assert [s for s, _ in list_checkpoints(tmp_path / "checkpoints")] == [1, 2]


def test_rank_streams_depend_on_seed_step_and_dp_rank_only():
    def draw(seed, step, dp_rank):
        seed_rank_stream(seed, step, dp_rank)
        return torch.rand(8)

    assert torch.equal(draw(0, 5, 1), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 0), draw(0, 5, 1))
    assert not torch.equal(draw(0, 5, 1), draw(0, 6, 1))
    assert not torch.equal(draw(0, 5, 1), draw(1, 5, 1))


def test_resume_on_another_layout_derives_the_stream_instead_of_restoring_it(tmp_path):
    cfg = make_cfg(tmp_path, train={"max_steps": 2}, eval={"batches": 0}, model={"dropout": 0.1})
    make_trainer(cfg).fit()
    path = tmp_path / "checkpoints" / "step_000002"
    meta = json.loads((path / "meta.json").read_text())
    cfg = make_cfg(tmp_path, train={"max_steps": 3}, eval={"batches": 0}, model={"dropout": 0.1})
    same = make_trainer(cfg)
    same._load_checkpoint(path)
    restored = torch.rand(4)
    meta["layout"] = {"world_size": 2, "dp_size": 2}  # as if saved by a 2-rank job
    (path / "meta.json").write_text(json.dumps(meta))
    other = make_trainer(cfg)
    other._load_checkpoint(path)
    derived = torch.rand(4)
    seed_rank_stream(cfg.train.seed, 2, 0)
    assert torch.equal(derived, torch.rand(4)) and not torch.equal(derived, restored)


def test_capped_eval_is_a_seeded_sample_independent_of_length():
    from lmforge.data.eval_sample import eval_order

    lengths = list(range(1, 201))  # example i has length i + 1: "the longest" would be the last indices
    a = eval_order(lengths, 40, seed=3)
    assert a == eval_order(lengths, 40, seed=3)  # the same at every evaluation
    assert a != eval_order(lengths, 40, seed=4)
    assert len(set(a)) == 40 and all(lengths[x] >= lengths[y] for x, y in itertools.pairwise(a))  # longest first
    assert sum(1 for i in a if i < 100) >= 10  # not the 40 longest: short examples are sampled too
    assert eval_order(lengths, None, seed=3) == sorted(range(200), key=lambda i: -lengths[i])
    assert sorted(eval_order(lengths, 500, seed=3)) == list(range(200))


def test_dev_evaluator_cap_keeps_a_seeded_sample():
    from lmforge.tasks.classify import DevEvaluator

    ids = [[1] * (i + 1) for i in range(64)]
    labels = [i % 2 for i in range(64)]
    ev = DevEvaluator(ids, labels, ["a", "b"], batch_size=4, pad_id=0, device=torch.device("cpu"), max_batches=4,
                      seed=0)
    lengths = sorted(int(n) for b in ev.batches for n in b[1])
    assert ev.n == 16 and min(lengths) < 48  # the 16 longest would all be >= 49


@pytest.mark.parametrize("key,value", [("lr", "nan"), ("lr", "inf"), ("eps", "nan"), ("weight_decay", "inf"),
                                       ("grad_clip", "nan"), ("betas", "[0.9, nan]")])
def test_optim_values_must_be_finite(tmp_path, key, value):
    from lmforge.train.config import load_config

    base = {"data": {"dir": "x"}, "model": {"preset": "tiny"},
            "train": {"global_batch": 8, "max_steps": 2}}
    with pytest.raises(ConfigError, match=rf"optim\.{key}.*must be a finite number"):
        load_config(None, [f"optim.{key}={value}"], base=base)


def test_errors_name_the_rank_and_summaries_print_once(monkeypatch, capsys):
    from types import SimpleNamespace

    from lmforge.train.rank_output import emit_once, errors_name_rank

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(UserError, match=r"^rank 1: data\.dir is bad"), errors_name_rank():
        raise UserError("data.dir is bad")
    emit_once(SimpleNamespace(json=False), "summary")
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("RANK", "0")
    emit_once(SimpleNamespace(json=False), "summary")
    assert capsys.readouterr().out == "summary\n"
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match=r"^data\.dir is bad"), errors_name_rank():
        raise UserError("data.dir is bad")


def test_sigint_checkpoints_and_exits_130_without_a_model(tmp_path):
    import os
    import signal

    class Interrupting(CountingSource):
        def next_batch(self):
            if self.i == 2:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C
            return super().next_batch()

    cfg = make_cfg(tmp_path, train={"max_steps": 10}, eval={"batches": 0})
    result = make_trainer(cfg, source=Interrupting()).fit()
    assert (result.stop_reason, result.signal, result.exit_code, result.step) == ("signal", "SIGINT", 130, 3)
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step_000003"
    assert result.model_dir is None and not (tmp_path / "model").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_memory_stats_peaks_restart_per_row_on_cpu():
    """The CPU high-water mark restarts after a reset read (Linux /proc/self/clear_refs): a row after a
    large, freed allocation no longer reports it."""
    import numpy as np

    from lmforge.train.metrics import memory_stats

    cpu = torch.device("cpu")
    memory_stats(cpu, reset=True)
    base = memory_stats(cpu)["mem_gb"]
    big = np.ones(400_000_000 // 8)  # 0.4 GB, touched
    peak_with = memory_stats(cpu, reset=True)["peak_mem_gb"]  # a row while it lives
    del big
    memory_stats(cpu, reset=True)  # the row whose window saw it freed
    peak_after = memory_stats(cpu, reset=True)["peak_mem_gb"]  # the next row: its window never held it
    assert peak_with >= base + 0.35, (base, peak_with)
    assert peak_after < peak_with - 0.3, (peak_with, peak_after)


def test_memory_stats_on_cuda_reports_reserved_and_resets_the_peaks(monkeypatch):
    from lmforge.train.metrics import memory_stats

    resets = []
    fake = {"memory_allocated": 1e9, "max_memory_allocated": 3e9, "memory_reserved": 4e9,
            "max_memory_reserved": 5e9}
    for name, value in fake.items():
        monkeypatch.setattr(torch.cuda, name, lambda device=None, v=value: v)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: resets.append(device))
    dev = torch.device("cuda", 0)
    assert memory_stats(dev) == {"mem_gb": 1.0, "peak_mem_gb": 3.0, "reserved_gb": 4.0, "peak_reserved_gb": 5.0}
    assert resets == []
    memory_stats(dev, reset=True)
    assert resets == [dev]
