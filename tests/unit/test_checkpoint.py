import json

import pytest
import torch

from lmforge.config import ConfigError, UserError
from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model
from lmforge.train import checkpoint as ckpt
from lmforge.train.config import OptimConfig
from lmforge.train.optim import build_optimizer
from lmforge.train.trainer import check_compatible, find_resume

CFG = get_preset("tiny", vocab_size=64, dim=32, n_heads=2, n_kv_heads=1, ffn_hidden=64)


def _trained(steps=2, seed=0):
    model = build_model(CFG, seed=seed)
    opt = build_optimizer(model, OptimConfig(lr=1e-2))
    x = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        logits = model(x[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_restores_model_and_optimizer_bitwise(tmp_path):
    model, opt = _trained()
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=2)
    path = mgr.save(2, model, opt, {"tokens": 64}, {"loader": {"pos": 7}})
    assert path.name == "step_000002" and (tmp_path / "LATEST").read_text().strip() == "step_000002"
    assert json.loads((path / "meta.json").read_text())["complete"] is True
    fresh = build_model(CFG, init=False)
    fresh_opt = build_optimizer(fresh, OptimConfig(lr=1e-2))
    meta, rank_state = mgr.load(path, fresh, fresh_opt)
    assert meta["step"] == 2 and meta["tokens"] == 64 and rank_state == {"loader": {"pos": 7}}
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    assert fresh.output.weight is fresh.tok_embeddings.weight  # tying survives the load
    s1, s2 = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in s1[k]:
            assert torch.equal(s1[k][name], s2[k][name]), (k, name)


def test_keep_last_prunes_old_but_keeps_latest(tmp_path):
    model, opt = _trained(1)
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        mgr.save(step, model, opt, {"tokens": step}, {})
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000004"
    # LATEST names an older checkpoint (e.g. a re-save after resume): it survives pruning
    (tmp_path / "LATEST").write_text("step_000003\n")
    mgr.keep_last = 1
    mgr.prune()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]


def test_partial_and_broken_checkpoints_are_never_picked(tmp_path):
    model, opt = _trained(1)
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=3)
    mgr.save(5, model, opt, {"tokens": 5}, {})
    # a save killed before its meta.json, and one killed after the rename but before LATEST
    (tmp_path / ".tmp_step_000010").mkdir()
    (tmp_path / ".tmp_step_000010" / "__0_0.distcp").write_bytes(b"partial")
    broken = tmp_path / "step_000008"
    broken.mkdir()
    (broken / "meta.json").write_text('{"complete": tru')  # torn write
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000005"
    (tmp_path / "LATEST").write_text("step_000099\n")  # names something that does not exist
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000005"
    mgr.clean_partial()
    assert not (tmp_path / ".tmp_step_000010").exists()


def test_resolve_accepts_step_checkpoints_and_run_dirs(tmp_path):
    model, opt = _trained(1)
    mgr = ckpt.CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    p = mgr.save(3, model, opt, {"tokens": 3}, {})
    assert ckpt.resolve_checkpoint(p) == p
    assert ckpt.resolve_checkpoint(tmp_path / "checkpoints") == p
    assert ckpt.resolve_checkpoint(tmp_path) == p
    with pytest.raises(UserError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / "nothing")


def test_math_changing_fields_are_refused_by_name(tmp_path):
    model, opt = _trained(1)
    mgr = ckpt.CheckpointManager(tmp_path / "checkpoints", keep_last=3)
    math = {"model.dim": 32, "data.seq_len": 16, "data.tokenizer_hash": "abc"}
    p = mgr.save(1, model, opt, {"tokens": 1, "math": math}, {})
    assert check_compatible(p, dict(math)) == []
    with pytest.raises(ConfigError, match=r"data\.seq_len=16 but the config says 32.*allow_mismatch=\[data\.seq_len\]"):
        check_compatible(p, {**math, "data.seq_len": 32})
    notes = check_compatible(p, {**math, "data.seq_len": 32}, allow=["data.seq_len"])
    assert notes and "data.seq_len" in notes[0]
    assert find_resume(tmp_path, "auto") == p
    with pytest.raises(ConfigError, match="train.resume=never"):
        find_resume(tmp_path, "never")
    assert find_resume(tmp_path / "fresh", "never") is None


def test_load_into_a_different_shape_is_a_clear_error(tmp_path):
    model, opt = _trained(1)
    mgr = ckpt.CheckpointManager(tmp_path, keep_last=3)
    p = mgr.save(1, model, opt, {"tokens": 1}, {})
    other = build_model(get_preset("tiny", vocab_size=64, dim=48, n_heads=2, n_kv_heads=1, ffn_hidden=64), seed=0)
    with pytest.raises(UserError, match="does not fit this model"):
        mgr.load(p, other, build_optimizer(other, OptimConfig()))


def test_rng_state_round_trip():
    import random

    import numpy as np

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    state = json.loads(json.dumps(ckpt.rng_state()))  # must survive JSON
    expected = (torch.rand(4), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    ckpt.set_rng_state(state)
    got = (torch.rand(4), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]
