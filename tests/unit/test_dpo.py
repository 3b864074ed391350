# ruff: noqa: F811  (pytest fixtures imported from _align_fixtures are used as arguments)
"""DPO-family preference tuning on a tiny model dir: the losses against their papers' formulas on
hand-computed numbers, ln 2 at step 0, completion-only masking, the truncation rules, the three reference
options agreeing with a frozen copy, the TRL-named metrics, exact resume, and clear errors."""

import json
import math

import pytest
import torch
from _align_fixtures import PAIRS, dpo_cfg, keep_torch_threads, model_dir, pairs_file, rows  # noqa: F401

from lmforge.artifacts.model_dir import load_weights
from lmforge.config import ConfigError, UserError
from lmforge.data.preference_pairs import (
    PairBatches,
    PreferencePair,
    collate_pairs,
    encode_pairs,
    load_pairs,
    record_to_pair,
    truncate_pair,
)
from lmforge.data.sft import IGNORE_INDEX, DataError
from lmforge.tasks.preference import PreferenceLoss, adapters_disabled, frozen_copy, pair_logps
from lmforge.tasks.run import run as finetune
from lmforge.train.losses import preference_losses, sequence_logps


def tokenizer_and_template(model_dir):
    from lmforge.tokenizer.chat_template import get_chat_template
    from lmforge.tokenizer.core import load_tokenizer

    tok = load_tokenizer(model_dir)
    return tok, get_chat_template(tok)


# ---- losses against the papers' formulas, computed by hand ------------------------------------------
def t(*v):
    return torch.tensor(v, dtype=torch.float64)


def test_sigmoid_and_ipo_match_hand_computed_values():
    lc, lr, rc, rr, nc, nr = t(-3.0), t(-5.0), t(-4.0), t(-4.5), t(3.0), t(5.0)
    z = 0.5 * ((-3.0 + 4.0) - (-5.0 + 4.5))  # β[(π_c − ref_c) − (π_r − ref_r)] = 0.5·1.5
    loss, rew_c, rew_r = preference_losses("sigmoid", lc, lr, nc, nr, rc, rr, beta=0.5)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-z)), abs=1e-12)
    assert float(rew_c) == pytest.approx(0.5) and float(rew_r) == pytest.approx(-0.25)
    smooth, _, _ = preference_losses("sigmoid", lc, lr, nc, nr, rc, rr, beta=0.5, label_smoothing=0.2)
    assert float(smooth) == pytest.approx(0.8 * math.log(1 + math.exp(-z)) + 0.2 * math.log(1 + math.exp(z)))
    ipo, _, _ = preference_losses("ipo", lc, lr, nc, nr, rc, rr, beta=0.5)
    assert float(ipo) == pytest.approx((1.0 / 3 - (-0.5) / 5 - 1 / (2 * 0.5)) ** 2, abs=1e-12)


def test_simpo_matches_the_paper():
    # SimPO (Meng et al. 2024, eq. 6): −log σ(β/|y_w| log π(y_w|x) − β/|y_l| log π(y_l|x) − γ)
    loss, rew_c, rew_r = preference_losses("simpo", t(-6.0), t(-6.0), t(2.0), t(4.0), beta=2.0, gamma=0.5)
    z = 2.0 * (-3.0) - 2.0 * (-1.5) - 0.5  # = -3.5
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-z)), abs=1e-12)
    assert float(rew_c) == pytest.approx(-6.0) and float(rew_r) == pytest.approx(-3.0)


def test_orpo_matches_the_paper():
    # ORPO (Hong et al. 2024, eqs. 2-7): L_SFT + λ·L_OR, L_OR = −log σ(log(odds(y_w)/odds(y_l))),
    # odds(y) = P/(1−P), P = exp(mean token log-prob); L_SFT = −mean token log-prob of y_w
    pw, pl = 0.5, 0.2  # per-token geometric means
    lc, lr = t(3 * math.log(pw)), t(2 * math.log(pl))
    loss, _, _ = preference_losses("orpo", lc, lr, t(3.0), t(2.0), lam=0.25)
    log_or = math.log((pw / (1 - pw)) / (pl / (1 - pl)))  # = log(1 / 0.25) = log 4
    expected = -math.log(pw) + 0.25 * -math.log(1 / (1 + math.exp(-log_or)))
    assert float(loss) == pytest.approx(expected, abs=1e-12)
    assert log_or == pytest.approx(math.log(4.0))


def test_sequence_logps_count_only_labelled_positions():
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX], [1, IGNORE_INDEX, IGNORE_INDEX, 2, 6]])
    s, n = sequence_logps(logits, labels)
    lp = torch.log_softmax(logits, -1)
    assert torch.allclose(s, torch.stack([lp[0, 2, 3] + lp[0, 3, 4], lp[1, 0, 1] + lp[1, 3, 2] + lp[1, 4, 6]]))
    assert n.tolist() == [2, 3]


# ---- data: formats, masking, truncation ---------------------------------------------------------------
def test_every_record_shape_gives_the_same_pair():
    want = PreferencePair([{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "A", "B")
    shapes = [
        {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "chosen": "A",
         "rejected": "B"},
        {"prompt": "Q", "system": "S", "chosen": [{"role": "assistant", "content": "A"}],
         "rejected": [{"role": "assistant", "content": "B"}]},
        {"conversations": [{"from": "human", "value": "Q"}], "system": "S", "chosen": {"from": "gpt", "value": "A"},
         "rejected": {"from": "gpt", "value": "B"}},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"}],
         "chosen": {"from": "gpt", "value": "A"}, "rejected": {"from": "gpt", "value": "B"}},
        {"chosen": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"}],
         "rejected": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                      {"role": "assistant", "content": "B"}]},
    ]
    for rec in shapes:
        got = record_to_pair(rec, "x")
        assert (got.prompt, got.chosen, got.rejected) == (want.prompt, want.chosen, want.rejected), rec


def test_llamafactory_ranking_file_loads(tmp_path):
    """A .json file in LLaMA-Factory's ranking layout (a list of records with ``conversations`` in ShareGPT
    roles, ``chosen`` / ``rejected`` replies, an optional ``system``), as its dpo_*_demo.json files are."""
    records = [
        {"conversations": [{"from": "human", "value": f"question {i}"}],
         "chosen": {"from": "gpt", "value": f"good answer {i}"},
         "rejected": {"from": "gpt", "value": f"bad answer {i}"}} for i in range(5)
    ] + [
        {"system": "你是一个有帮助的助手。",
         "conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                           {"from": "human", "value": "写一句诗"}],
         "chosen": {"from": "gpt", "value": "床前明月光"}, "rejected": {"from": "gpt", "value": "不会"}},
    ]
    path = tmp_path / "dpo_demo.json"
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    pairs = load_pairs(path)
    assert len(pairs) == 6
    assert [(p.prompt[-1]["content"], p.chosen, p.rejected) for p in pairs[:5]] == [
        (f"question {i}", f"good answer {i}", f"bad answer {i}") for i in range(5)]
    last = pairs[5]
    assert [m["role"] for m in last.prompt] == ["system", "user", "assistant", "user"]
    assert last.prompt[0]["content"] == "你是一个有帮助的助手。"
    assert (last.chosen, last.rejected) == ("床前明月光", "不会")


def test_bad_records_name_file_line_and_fix(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Q", "chosen": "A"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: a preference record needs 'chosen' and 'rejected'"):
        load_pairs(bad)
    bad.write_text(json.dumps({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "A",
                               "rejected": "B"}) + "\n")
    with pytest.raises(DataError, match="must end with a user turn"):
        load_pairs(bad)


def test_completions_follow_the_same_prompt_and_only_they_carry_targets(model_dir):
    from lmforge.tokenizer.chat_template import encode_chat

    tok, template = tokenizer_and_template(model_dir)
    pair = record_to_pair(PAIRS[1], "x")
    data = encode_pairs(tok, [pair], 64, template)
    # the same tokens SFT trains for that reply
    ids, labels = encode_chat(tok, [*pair.prompt, {"role": "assistant", "content": pair.chosen}], template)
    n = len(data.prompt[0]) + len(data.chosen[0])
    assert data.prompt[0] + data.chosen[0] == ids[:n]  # (SFT adds the untrained text after the turn)
    assert all(x == IGNORE_INDEX for x in labels[n:])
    assert data.chosen[0] == [x for x in labels if x != IGNORE_INDEX]
    assert data.chosen[0][-1] == tok.eos_id and data.rejected[0][-1] == tok.eos_id
    b = collate_pairs(data, [0], pad_id=0)
    n_p = len(data.prompt[0])
    for side in ("chosen", "rejected"):
        full = data.prompt[0] + getattr(data, side)[0]
        lab = b[f"{side}_labels"][0]
        targets = lab[lab != IGNORE_INDEX].tolist()
        assert targets == getattr(data, side)[0]  # exactly the completion, EOS included
        assert (lab[:n_p - 1] == IGNORE_INDEX).all()  # no prompt token is a target
        assert b[f"{side}_tokens"][0, :len(full) - 1].tolist() == full[:-1]


def test_truncation_cuts_the_prompt_first_then_the_completions():
    P, C, R = list(range(100, 130)), list(range(10)), list(range(20))  # 30 + 20 > 41
    p, c, r, pc, cc = truncate_pair(P, C, R, seq_len=40, max_prompt_len=25)
    assert p == P[-25:] and c == C and r == R[:16] and pc and cc  # prompt keeps its end; then completions cut
    p, c, r, pc, cc = truncate_pair(P, C, R, seq_len=60, max_prompt_len=10)
    assert (p, c, r, pc, cc) == (P, C, R, False, False)  # fits: nothing is cut
    p, c, r, pc, cc = truncate_pair(P[:5], C, R, seq_len=20, max_prompt_len=10)
    assert p == P[:5] and c == C and r == R[:16] and not pc and cc  # short prompt stays whole


def test_truncation_in_encoding_is_counted_and_empty_pairs_dropped(model_dir):
    tok, template = tokenizer_and_template(model_dir)
    long = PreferencePair([{"role": "user", "content": "hello there " * 40}], "Four.", "Five.")
    data = encode_pairs(tok, [long, record_to_pair(PAIRS[0], "x")], 24, template, max_prompt_len=12)
    assert data.stats["prompt_truncated"] == 1 and len(data.prompt[0]) == 12
    assert all(len(p) + max(len(c), len(r)) <= 25 for p, c, r in zip(data.prompt, data.chosen, data.rejected))
    with pytest.raises(DataError, match="every one of the 1 pairs was dropped"):
        encode_pairs(tok, [long], 8, template, max_prompt_len=40)  # a 40-token prompt leaves no room


# ---- the model side ---------------------------------------------------------------------------------------
def _batch(model_dir, n=4):
    tok, template = tokenizer_and_template(model_dir)
    data = encode_pairs(tok, [record_to_pair(r, "x") for r in PAIRS[:n]], 64, template)
    return collate_pairs(data, list(range(n)), pad_id=0), data


def test_policy_equal_to_reference_gives_ln2_and_rewards_zero(model_dir):
    from lmforge.artifacts.model_dir import load_model_dir

    model = load_model_dir(model_dir)
    batch, _ = _batch(model_dir)
    loss = PreferenceLoss("sigmoid", beta=0.1, reference="copy", ref_model=frozen_copy(model))
    d = loss.details(model, batch)
    assert torch.equal(d["losses"], torch.full((4,), math.log(2.0)))
    assert torch.equal(d["rewards_chosen"], torch.zeros(4)) and torch.equal(d["rewards_rejected"], torch.zeros(4))


def test_lora_disabled_and_precomputed_references_equal_a_frozen_copy(model_dir):
    from lmforge.artifacts.model_dir import load_model_dir
    from lmforge.models.lora import LoraConfig, apply_lora

    base = load_model_dir(model_dir)
    batch, _ = _batch(model_dir)
    with torch.no_grad():
        ref_c, ref_r, _, _ = pair_logps(base, batch)
    policy = load_model_dir(model_dir)
    apply_lora(policy, LoraConfig(rank=4, alpha=8, targets=["all-linear"]))
    with torch.no_grad():  # move the adapters off zero so the policy differs from the base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    copy_loss = PreferenceLoss("sigmoid", reference="copy", ref_model=base).details(policy, batch)
    lora_loss = PreferenceLoss("sigmoid", reference="lora").details(policy, batch)
    pre = dict(batch, ref_chosen=ref_c, ref_rejected=ref_r)
    pre_loss = PreferenceLoss("sigmoid", reference="precomputed").details(policy, pre)
    assert not torch.allclose(copy_loss["losses"], torch.full((4,), math.log(2.0)))  # the policy moved
    for other in (lora_loss, pre_loss):
        for k in copy_loss:
            assert torch.equal(copy_loss[k], other[k]), k
    with adapters_disabled(policy), torch.no_grad():  # adapters off = the base, exactly
        c, r, _, _ = pair_logps(policy, batch)
    assert torch.equal(c, ref_c) and torch.equal(r, ref_r)


def test_pair_batches_resume_and_do_not_depend_on_world_size(model_dir):
    _, data = _batch(model_dir, 8)
    one = PairBatches(data, 4, seed=3)
    stream = [one.next_batch()["index"].tolist() for _ in range(5)]
    halves = [PairBatches(data, 4, rank=r, world_size=2, seed=3) for r in range(2)]
    assert [[i for h in halves for i in h.next_batch()["index"].tolist()] for _ in range(5)] == stream
    again = PairBatches(data, 4, seed=3)
    for _ in range(3):
        again.next_batch()
    resumed = PairBatches(data, 4, seed=3)
    resumed.load_state_dict(again.state_dict())
    assert [resumed.next_batch()["index"].tolist() for _ in range(2)] == stream[3:]


# ---- the recipe ---------------------------------------------------------------------------------------------
def test_dpo_run_reports_trl_metrics_and_learns_the_preference(model_dir, pairs_file, tmp_path):
    res = finetune(dpo_cfg(model_dir, pairs_file, tmp_path / "run", train={"max_steps": 8}, eval={"interval": 4}))
    evals = rows(tmp_path / "run", "eval")
    keys = {"val_loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected"}
    assert all(keys <= set(e) for e in evals)
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert last["rewards/margins"] > 0.1 and last["rewards/accuracies"] > 0.5 and last["val_loss"] < first["val_loss"]
    train = rows(tmp_path / "run", "train")
    assert train[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)  # policy == reference at step 0
    assert res.model_dir and (tmp_path / "run" / "model" / "model.safetensors").is_file()
    assert res.train.loss_tokens == 8 * 4  # pairs the loss summed (tokens: inputs processed)


@pytest.mark.parametrize("loss", ["ipo", "simpo", "orpo"])
def test_other_losses_train(model_dir, pairs_file, tmp_path, loss):
    extra = {"beta": 2.0, "gamma": 0.5} if loss == "simpo" else {}
    res = finetune(dpo_cfg(model_dir, pairs_file, tmp_path / loss, dpo={"loss": loss, **extra},
                           train={"max_steps": 6}, eval={"interval": 6, "at_start": True}))
    evals = rows(tmp_path / loss, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert res.train.val["rewards/margins"] > evals[0]["rewards/margins"]


def test_precomputed_reference_is_stored_and_matches_the_frozen_copy_run(model_dir, pairs_file, tmp_path):
    a = finetune(dpo_cfg(model_dir, pairs_file, tmp_path / "copy"))
    b = finetune(dpo_cfg(model_dir, pairs_file, tmp_path / "pre", dpo={"precompute_ref": True}))
    store = tmp_path / "pre" / "reference_logps.safetensors"
    assert store.is_file() and json.loads((tmp_path / "pre" / "reference_logps.json").read_text())["done"]["train"] > 0
    la, lb = [r["loss"] for r in rows(tmp_path / "copy", "train")], [r["loss"] for r in rows(tmp_path / "pre", "train")]
    assert la == pytest.approx(lb, abs=1e-5)
    assert a.train.val["rewards/margins"] == pytest.approx(b.train.val["rewards/margins"], abs=1e-4)


def test_lora_dpo_trains_only_adapters_with_the_base_as_reference(model_dir, pairs_file, tmp_path):
    res = finetune(dpo_cfg(model_dir, pairs_file, tmp_path / "lora", dpo={"lora": True},
                           lora={"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["all-linear"]},
                           optim={"lr": 3e-2}))
    assert res.trainable_params < res.total_params / 4
    train = rows(tmp_path / "lora", "train")
    assert train[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert (tmp_path / "lora" / "adapter" / "adapter_model.safetensors").is_file()
    assert res.train.val["rewards/margins"] > 0


@pytest.mark.parametrize("extra", [{}, {"dpo": {"precompute_ref": True}}], ids=["copy", "precomputed"])
def test_resume_after_a_crash_is_exact(model_dir, pairs_file, tmp_path, monkeypatch, extra):
    straight = finetune(dpo_cfg(model_dir, pairs_file, tmp_path / "a", **extra))
    calls = {"n": 0}
    orig = PairBatches.next_batch

    def crash(self):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("simulated crash")
        return orig(self)

    with monkeypatch.context() as m:
        m.setattr(PairBatches, "next_batch", crash)
        with pytest.raises(RuntimeError, match="simulated crash"):
            finetune(dpo_cfg(model_dir, pairs_file, tmp_path / "b", **extra))
    resumed = finetune(dpo_cfg(model_dir, pairs_file, tmp_path / "b", **extra))
    assert resumed.train.resumed_from and resumed.train.resumed_from.endswith("step_000002")
    a, b = load_weights(straight.model_dir), load_weights(resumed.model_dir)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in rows(tmp_path / "a", "train")] == [r["loss"] for r in rows(tmp_path / "b", "train")]
    assert [r["rewards/margins"] for r in rows(tmp_path / "a", "eval")] == \
           [r["rewards/margins"] for r in rows(tmp_path / "b", "eval")]


def test_config_errors_name_the_key_and_fix(model_dir, pairs_file, tmp_path):
    with pytest.raises(ConfigError, match="dpo.beta=0.0 must be positive"):
        dpo_cfg(model_dir, pairs_file, tmp_path, dpo={"beta": 0.0})
    with pytest.raises(ConfigError, match="reference-free"):
        dpo_cfg(model_dir, pairs_file, tmp_path, dpo={"loss": "simpo", "precompute_ref": True})
    with pytest.raises(ConfigError, match="data.format=alpaca should be auto"):
        dpo_cfg(model_dir, pairs_file, tmp_path, data={"format": "alpaca"})
    with pytest.raises(ConfigError, match="dpo.loss"):
        dpo_cfg(model_dir, pairs_file, tmp_path, dpo={"loss": "kto"})
    cfg = dpo_cfg(model_dir, pairs_file, tmp_path, dpo={"loss": "orpo", "lambda": 0.3})
    assert cfg.dpo.lambda_ == 0.3
    with pytest.raises(UserError, match="fewer than one global batch"):
        finetune(dpo_cfg(model_dir, pairs_file, tmp_path / "big", train={"global_batch": 64, "micro_batch": 8}))


def test_a_run_drops_identical_pairs_with_one_warning_line(model_dir, tmp_path, capsys, monkeypatch):
    """Pairs with the same chosen and rejected reply (or both empty) would train at a constant 0.6931: the
    run drops them, counts them in its data stats and says so in one line."""
    same = [{"prompt": "Say hello.", "chosen": "Hello.", "rejected": "Hello."},
            {"prompt": "Say nothing.", "chosen": "", "rejected": ""}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in PAIRS + same), encoding="utf-8")
    cfg = dpo_cfg(model_dir, path, tmp_path / "run", data={"dev_fraction": 0.0}, train={"max_steps": 1},
                  eval={"batches": 0, "at_start": False}, checkpoint={"interval": 0, "save_model": False})
    from lmforge.tasks.preference import PreferenceTask

    seen = {}
    real = PreferenceTask.read_data

    def spy(self, world, device):
        real(self, world, device)
        seen.update(self.stats["train"])

    monkeypatch.setattr(PreferenceTask, "read_data", spy)
    finetune(cfg)
    assert seen["identical"] == 2 and seen["pairs"] == len(PAIRS) + 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "chosen and rejected replies are the same" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: data.train: dropped 2 of 26")
