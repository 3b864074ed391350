"""Loss spikes (``train.spike``): the robust threshold (median + k·MAD over a window) as pure functions, the
config checks, and the Trainer's three actions on a deterministic spike — a poisoned batch (its loss scaled
50×) or a loss hook — in one process: ``skip`` makes no update, ``rollback`` reloads the last checkpoint and
skips exactly the batches read since (the run then equals one whose data never held them), ``stop``
checkpoints the weights from before the spike; the rollback bound, the lowered lr and the event rows.
Two ranks through the CLI: tests/distributed/test_trainer_spike.py."""

import json
import math

import pytest
import torch
from test_trainer import CountingSource, make_cfg, make_trainer

from lmforge.artifacts.model_dir import load_model_dir
from lmforge.config import ConfigError, from_dict
from lmforge.train.config import PretrainConfig, validate
from lmforge.train.spike import MAD_FLOOR, SpikeDetector, mad, median, threshold
from lmforge.train.trackers import Tracker
from lmforge.train.trainer import LossSpikeStop, TrainingDiverged, causal_lm_loss

POISON = 4  # the batch index (0-based) whose loss is scaled: the batch of step 5


# ---- the statistics --------------------------------------------------------------------------------------
def test_median_mad_and_threshold():
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([4.0, 1.0, 3.0, 2.0]) == 2.5
    values = [1.0, 1.1, 0.9, 1.0, 5.0]  # the outlier moves neither the median nor the MAD much
    assert median(values) == 1.0 and mad(values) == pytest.approx(0.1)
    assert threshold(values, 6.0) == pytest.approx(1.6)
    assert threshold([2.0] * 5, 6.0) == pytest.approx(2.0 + 6.0 * MAD_FLOOR * 2.0)  # flat: the floor
    with pytest.raises(ValueError):
        median([])


def test_detector_history_window_and_metrics():
    det = SpikeDetector("loss", window=4, k=3.0, min_history=3)
    assert det.check(100.0, 1.0) is None  # no history yet: only non-finite counts
    for v in (1.0, 1.2, 0.8):
        det.observe(v, 1.0)
    v = det.check(2.0, 1.0)
    assert v is not None and v.metric == "loss" and v.threshold == pytest.approx(1.0 + 3 * 0.2) and not v.nonfinite
    assert det.check(0.1, 50.0) is None  # a drop is no spike; grad_norm is not watched
    for v2 in (5.0, 5.0, 5.0, 5.0):  # the window keeps the newest 4
        det.observe(v2, 1.0)
    assert list(det.history["loss"]) == [5.0] * 4 and det.check(5.0 + 1e-6, 1.0) is None
    nan = det.check(float("nan"), 1.0)
    assert nan.nonfinite and "non-finite loss" in nan.describe()
    assert det.check(1.0, float("inf")).metric == "grad_norm"
    det.observe(float("nan"), 1.0)
    assert list(det.history["loss"]) == [5.0] * 4  # never a non-finite value in the history

    both = SpikeDetector("both", window=10, k=3.0, min_history=2)
    gn = SpikeDetector("grad_norm", window=10, k=3.0, min_history=2)
    for d in (both, gn):
        for loss, g in ((2.0, 1.0), (2.1, 1.1), (1.9, 0.9)):
            d.observe(loss, g)
    assert both.check(2.0, 9.0).metric == "grad_norm" and both.check(9.0, 1.0).metric == "loss"
    assert gn.check(9.0, 1.0) is None and gn.check(2.0, 9.0).metric == "grad_norm"

    restored = SpikeDetector("both", window=2, k=3.0, min_history=2)
    restored.load_state_dict(json.loads(json.dumps(both.state_dict())))
    assert list(restored.history["loss"]) == [2.1, 1.9]  # a smaller window keeps the newest
    restored.load_state_dict(None)
    assert not restored.history["loss"]
    with pytest.raises(ValueError):
        SpikeDetector("loss", window=3, min_history=4)


# ---- the config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,value,match", [
    ("window", 0, "train.spike.window=0"),
    ("min_history", 50, "train.spike.min_history=50 must be in 1..train.spike.window=10"),
    ("k", 0, "train.spike.k=0"),
    ("k", float("nan"), "train.spike.k=nan"),
    ("max_rollbacks", 0, "train.spike.max_rollbacks=0"),
    ("lr_factor", 2.0, "train.spike.lr_factor=2.0 must be in"),
    ("lr_factor", 0.5, "needs train.spike.lr_factor_steps"),
    ("lr_factor_steps", -1, "train.spike.lr_factor_steps=-1"),
])
def test_config_checks_name_the_key(tmp_path, key, value, match):
    cfg = make_cfg(tmp_path, train={"spike": {"window": 10, "min_history": 5, key: value}})
    with pytest.raises(ConfigError, match=match.replace("[", r"\[").replace(".", r"\.")):
        validate(cfg)


def test_config_section_and_unknown_keys(tmp_path):
    cfg = make_cfg(tmp_path, train={"spike": {"action": "rollback", "metric": "both", "lr_factor": 0.5,
                                              "lr_factor_steps": 10}})
    assert cfg.train.spike.action == "rollback" and cfg.train.spike.metric == "both"
    with pytest.raises(ConfigError, match="train.spike.action=rollback .* set checkpoint.interval > 0"):
        validate(make_cfg(tmp_path, train={"spike": {"action": "rollback"}}, checkpoint={"interval": 0}))
    assert PretrainConfig().train.spike.action == "none"  # off unless asked for
    with pytest.raises(ConfigError, match="train.spike.action"):
        make_cfg(tmp_path, train={"spike": {"action": "undo"}})
    with pytest.raises(ConfigError, match="unknown config key 'train.spike.kk'"):
        make_cfg(tmp_path, train={"spike": {"kk": 1}})
    from lmforge.tasks.config import FinetuneTrainConfig

    assert from_dict(FinetuneTrainConfig, {"spike": {"action": "skip"}}).spike.action == "skip"  # shared


# ---- the Trainer -----------------------------------------------------------------------------------------
class SkippingSource(CountingSource):
    """CountingSource whose stream never held batches [a, b): the reference a rollback must equal."""

    def __init__(self, a, b, **kw):
        super().__init__(**kw)
        self.a, self.b = a, b

    def next_batch(self):
        if self.i == self.a:
            self.i = self.b
        return super().next_batch()


def poisoned(source, index=POISON, factor=50.0, value=None):
    """A loss whose value on batch ``index`` of ``source`` is scaled (or replaced by ``value``): a spike
    that lives in the data, as a poisoned window does (a rollback that skips the batch never meets it)."""

    def loss_fn(model, batch):
        loss, n = causal_lm_loss(model, batch)
        if model.training and source.i - 1 == index:
            loss = loss * (value if value is not None else factor)
        return loss, n

    return loss_fn


def spike_cfg(run_dir, steps=10, **spike):
    return make_cfg(run_dir, train={"max_steps": steps, "spike": {"min_history": 2, "window": 10, **spike}},
                    eval={"batches": 0}, checkpoint={"interval": 3})


def rows(run_dir, kind="train"):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def weights(run_dir):
    return load_model_dir(run_dir / "model").state_dict()


def assert_same_weights(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_rollback_skips_exactly_the_batches_since_the_checkpoint_and_equals_a_run_without_them(tmp_path):
    ref = make_trainer(spike_cfg(tmp_path / "ref"), source=SkippingSource(3, 5))
    ref.fit()
    source = CountingSource()
    trainer = make_trainer(spike_cfg(tmp_path / "run", action="rollback"), source=source,
                           loss_fn=poisoned(source))
    loaded = []
    original = trainer._load_checkpoint
    trainer._load_checkpoint = lambda path, notes=True: (loaded.append(path.name), original(path, notes))[1]
    result = trainer.fit()
    assert loaded == ["step_000003"] and result.step == 10 and result.stop_reason == "max_steps"
    assert result.rollbacks == 1
    assert source.i == 12  # batches 0..2, 3..4 (undone), then 5..11: none read twice, 3 and 4 never trained on
    spikes = [e for e in rows(tmp_path / "run", "event") if e["event"] == "spike"]
    assert len(spikes) == 1
    e = spikes[0]
    assert (e["action"], e["step"], e["spike_step"], e["checkpoint"], e["rollbacks"], e["skipped_steps"]) == \
        ("rollback", 3, 5, "step_000003", 1, [4, 5])
    assert e["metric"] == "loss" and e["value"] > e["threshold"] > 0
    got, want = rows(tmp_path / "run"), rows(tmp_path / "ref")
    assert [r["step"] for r in got] == list(range(1, 11))  # the undone steps' rows are gone
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert_same_weights(weights(tmp_path / "run"), weights(tmp_path / "ref"))
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step_000009" / "meta.json").read_text())
    assert meta["trainer"]["spike"]["rollbacks"] == 1 and len(meta["trainer"]["spike"]["history"]["loss"]) == 9


def test_rollback_lowers_the_lr_for_a_while(tmp_path):
    source = CountingSource()
    cfg = spike_cfg(tmp_path, action="rollback", lr_factor=0.25, lr_factor_steps=2)
    make_trainer(cfg, source=source, loss_fn=poisoned(source)).fit()
    lrs = {r["step"]: r["lr"] for r in rows(tmp_path)}
    assert [lrs[s] for s in (3, 4, 5, 6)] == [1e-2, 2.5e-3, 2.5e-3, 1e-2]
    assert [e.get("lr_factor_until") for e in rows(tmp_path, "event") if e["event"] == "spike"] == [5]


def test_skip_makes_no_update_and_equals_a_run_without_the_batch(tmp_path):
    ref = make_trainer(spike_cfg(tmp_path / "ref", steps=9), source=SkippingSource(POISON, POISON + 1))
    ref.fit()
    source = CountingSource()
    trainer = make_trainer(spike_cfg(tmp_path / "run", action="skip"), source=source, loss_fn=poisoned(source))
    snapshots = []
    original = trainer.train_step

    def recording(batch):
        out = original(batch)
        snapshots.append(trainer.raw_model.layers[0].attention.wq.weight.detach().clone())
        return out

    trainer.train_step = recording
    result = trainer.fit()
    assert result.step == 10 and torch.equal(snapshots[3], snapshots[4])  # step 5 made no update
    e = [e for e in rows(tmp_path / "run", "event") if e["event"] == "spike"]
    assert [(x["step"], x["action"], x["skipped_in_a_row"]) for x in e] == [(5, "skip", 1)]
    assert_same_weights(weights(tmp_path / "run"), weights(tmp_path / "ref"))  # 9 updates, the same ones


def test_stop_checkpoints_the_weights_from_before_the_spike_and_a_rerun_continues(tmp_path):
    source = CountingSource()
    trainer = make_trainer(spike_cfg(tmp_path, action="stop"), source=source, loss_fn=poisoned(source))
    good = {}
    original = trainer.train_step

    def recording(batch):
        if trainer.step == POISON:
            good.update({k: v.clone() for k, v in trainer.raw_model.state_dict().items()})
        return original(batch)

    trainer.train_step = recording
    with pytest.raises(LossSpikeStop, match=r"loss spike at step 5 \(train.spike.action=stop\): loss .* above the "
                                            r"threshold .*checkpointed in .*step_000005"):
        trainer.fit()
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step_000005"
    assert not (tmp_path / "model").exists()
    events = [e for e in rows(tmp_path, "event") if not e["event"].startswith("checkpoint")]  # saves have rows too
    assert [(e["event"], e.get("action"), e.get("reason")) for e in events[-2:]] == \
        [("spike", "stop", None), ("end", None, "spike")]
    fresh = make_trainer(spike_cfg(tmp_path))
    fresh.ckpt.load(tmp_path / "checkpoints" / "step_000005", fresh.model, fresh.optimizer)
    for k, v in good.items():
        assert torch.equal(fresh.raw_model.state_dict()[k], v), k
    rerun_source = CountingSource()
    rerun = make_trainer(spike_cfg(tmp_path), source=rerun_source)
    assert rerun.fit().step == 10 and rerun_source.i == 10  # resumed at step 5, after the spiked batch


def test_rollbacks_are_bounded_then_the_run_stops(tmp_path):
    """A spike that is not in the data (every step from 5 on) comes back after each rollback."""
    holder = {}

    def always_from_step_5(model, batch):
        loss, n = causal_lm_loss(model, batch)
        return (loss * 50.0 if model.training and holder["t"].step >= POISON else loss), n

    trainer = holder["t"] = make_trainer(spike_cfg(tmp_path, action="rollback", max_rollbacks=2),
                                         loss_fn=always_from_step_5)
    with pytest.raises(LossSpikeStop, match=r"loss spike at step 5 after 2 rollbacks "
                                            r"\(train.spike.max_rollbacks=2\)"):
        trainer.fit()
    spikes = [e for e in rows(tmp_path, "event") if e["event"] == "spike"]
    assert [(e["action"], e["step"], e["rollbacks"]) for e in spikes] == \
        [("rollback", 3, 1), ("rollback", 3, 2), ("stop", 5, 2)]
    assert spikes[1]["skipped_steps"] == [4, 5] and trainer.train_batches.i == 9  # 3 x 2 batches skipped
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step_000005"


def test_nonfinite_step_rolls_back_with_action_rollback(tmp_path):
    source = CountingSource()
    cfg = spike_cfg(tmp_path, action="rollback")
    result = make_trainer(cfg, source=source, loss_fn=poisoned(source, value=float("nan"))).fit()
    assert result.step == 10 and result.nonfinite_total == 0
    e = [e for e in rows(tmp_path, "event") if e["event"] == "spike"]
    assert [(x["step"], x["spike_step"], x["action"], x["threshold"]) for x in e] == [(3, 5, "rollback", None)]
    assert all(math.isfinite(r["loss"]) for r in rows(tmp_path))


def test_spikes_skipped_in_a_row_stop_at_max_nonfinite(tmp_path):
    holder = {}

    def from_step_5(model, batch):
        loss, n = causal_lm_loss(model, batch)
        return (loss * 50.0 if model.training and holder["t"].step >= POISON else loss), n

    cfg = make_cfg(tmp_path, train={"max_steps": 12, "max_nonfinite": 3,
                                    "spike": {"action": "skip", "min_history": 2, "window": 10}},
                   eval={"batches": 0})
    trainer = holder["t"] = make_trainer(cfg, loss_fn=from_step_5)
    with pytest.raises(TrainingDiverged, match="3 steps in a row skipped at step 7 .*train.spike.action=rollback"):
        trainer.fit()


def test_no_spike_action_keeps_the_old_behaviour_and_costs_no_collective(tmp_path):
    trainer = make_trainer(make_cfg(tmp_path, train={"max_steps": 2}, eval={"batches": 0}))
    assert trainer.spike is None and trainer.spike_verdict(1e9, 1e9) is None


# ---- trackers and the report -----------------------------------------------------------------------------
class Recorder(Tracker):
    def __init__(self):
        super().__init__()
        self.logged = []

    def _log(self, step, values):
        self.logged.append((step, values))


def test_spike_events_reach_the_trackers_at_the_spiked_step():
    t = Recorder()
    t.log({"kind": "event", "event": "start", "step": 0})
    t.log({"kind": "event", "event": "spike", "step": 3, "spike_step": 5, "action": "rollback", "loss": 9.5,
           "grad_norm": 2.0, "value": 9.5, "threshold": 4.0, "median": 3.9, "rollbacks": 1,
           "skipped_steps": [4, 5], "metric": "loss"})
    assert t.logged == [(5, {"spike/loss": 9.5, "spike/grad_norm": 2.0, "spike/value": 9.5, "spike/threshold": 4.0,
                             "spike/median": 3.9, "spike/rollbacks": 1.0, "spike/rollback": 1.0,
                             "spike/to_step": 3.0})]


def test_report_marks_spikes_on_the_loss_curve(tmp_path):
    pytest.importorskip("matplotlib")
    from lmforge.train import report

    rows_ = [{"kind": "train", "step": s, "loss": 4.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 11)]
    rows_ += [{"kind": "event", "event": "spike", "step": 3, "spike_step": 5, "action": "rollback", "loss": 40.0},
              {"kind": "event", "event": "spike", "step": 8, "spike_step": 8, "action": "skip", "loss": "nan"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    marks = report.mark_events(ax, rows_, top=4.0)
    assert [(m["x"], m["y"], m["label"]) for m in marks] == [(5, 4.0, "rollback to 3 (loss 40)"), (8, 4.0, "skip (loss nan)")]
    plt.close(fig)
    assert report.plot(tmp_path).is_file()


def test_a_spike_before_the_first_checkpoint_stops_with_the_reason(tmp_path):
    source = CountingSource()
    cfg = make_cfg(tmp_path, train={"max_steps": 10, "spike": {"action": "rollback", "min_history": 2}},
                   eval={"batches": 0}, checkpoint={"interval": 5})
    with pytest.raises(LossSpikeStop, match="loss spike at step 4 .* and no verified checkpoint to roll back to; "
                                            "set checkpoint.interval"):
        make_trainer(cfg, source=source, loss_fn=poisoned(source, index=3)).fit()
    assert (tmp_path / "checkpoints" / "LATEST").read_text().strip() == "step_000004"


def test_fine_tuning_rolls_back_too(tmp_path, monkeypatch):
    """LoRA SFT (adapter-only checkpoints, a frozen base) through the fine-tuning entry point: the shared
    Trainer rolls back on a spike its loss hook injects once, at step 5, and finishes."""
    from test_finetune import SFT, sft_cfg

    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model
    from lmforge.tasks.run import run as finetune
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.train import trainer as trainer_mod

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(r["instruction"] + " " + r["output"] for r in SFT) * 10, encoding="utf-8")
    train_tokenizer([str(corpus)], 300, tmp_path / "tok", progress=False)
    mcfg = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64,
                       tie_embeddings=True)
    model_dir = save_model_dir(build_model(mcfg, seed=0), tmp_path / "model", tokenizer_dir=str(tmp_path / "tok"))
    sft_file = tmp_path / "train.jsonl"
    sft_file.write_text("".join(json.dumps(r) + "\n" for r in SFT), encoding="utf-8")
    original, fired = trainer_mod.Trainer.train_step, []

    def train_step(self, batch):
        if self.step == POISON and not fired:
            fired.append(True)
            loss_fn = self.loss_fn

            def scaled(model, b):
                loss, n = loss_fn(model, b)
                return loss * 50.0, n

            self.loss_fn = scaled
            try:
                return original(self, batch)
            finally:
                self.loss_fn = loss_fn
        return original(self, batch)

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", train_step)
    cfg = sft_cfg(model_dir, sft_file, tmp_path / "run", finetune={"mode": "lora"},
                  train={"max_steps": 8, "spike": {"action": "rollback", "min_history": 2, "window": 10}},
                  lora={"rank": 4, "alpha": 8, "targets": ["all-linear"]}, eval={"interval": 0, "batches": 0},
                  checkpoint={"interval": 3})
    res = finetune(cfg)
    assert res.train.step == 8 and res.train.rollbacks == 1 and res.adapter_dir
    e = [r for r in rows(tmp_path / "run", "event") if r["event"] == "spike"]
    assert [(x["action"], x["step"], x["spike_step"]) for x in e] == [("rollback", 3, 5)]
    assert [r["step"] for r in rows(tmp_path / "run")] == list(range(1, 9))


def test_the_rollback_count_survives_a_restart(tmp_path):
    """The bound is over the whole run: the count is in the checkpoints, so a re-run does not reset it."""
    holder = {}

    def from_step_5(model, batch):
        loss, n = causal_lm_loss(model, batch)
        return (loss * 50.0 if model.training and holder["t"].step >= POISON else loss), n

    cfg = spike_cfg(tmp_path, action="rollback", max_rollbacks=1)
    trainer = holder["t"] = make_trainer(cfg, loss_fn=from_step_5)
    with pytest.raises(LossSpikeStop, match="after 1 rollbacks"):
        trainer.fit()
    meta = json.loads((tmp_path / "checkpoints" / "step_000005" / "meta.json").read_text())
    assert meta["trainer"]["spike"]["rollbacks"] == 1
    again = holder["t"] = make_trainer(cfg, loss_fn=from_step_5)
    with pytest.raises(LossSpikeStop, match="loss spike at step 6 after 1 rollbacks"):
        again.fit()
    spikes = [e for e in rows(tmp_path, "event") if e["event"] == "spike"]
    assert [(e["action"], e["spike_step"]) for e in spikes] == [("rollback", 5), ("stop", 5), ("stop", 6)]
