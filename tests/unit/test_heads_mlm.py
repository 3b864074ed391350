"""The masked-LM head and BERT's masking recipe."""

import pytest
import torch

from lmforge.artifacts.heads_dir import load_heads, save_heads
from lmforge.artifacts.metadata import read_metadata
from lmforge.config import UserError
from lmforge.models.heads import (
    IGNORE_INDEX,
    MLMHead,
    Pooler,
    mask_tokens,
    mlm_logits,
)
from lmforge.models.presets import get_preset
from lmforge.models.transformer import build_model

MASK, SPECIAL = 4, (0, 1, 2)


def test_mask_tokens_follows_15_80_10_10():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 1000, (64, 512), generator=g)
    tokens[:, 0], tokens[:, -1] = 1, 2  # [CLS] ... [SEP]
    inputs, labels = mask_tokens(tokens, MASK, 1000, SPECIAL, generator=g)
    selected = labels != IGNORE_INDEX
    assert not selected[:, 0].any() and not selected[:, -1].any()  # specials never chosen
    assert torch.equal(labels[selected], tokens[selected])
    frac = selected.float().mean().item() * 512 / 510
    assert abs(frac - 0.15) < 0.005
    n = selected.sum().item()
    masked = (inputs == MASK) & selected
    unchanged = (inputs == tokens) & selected
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(unchanged.sum().item() / n - 0.1) < 0.01  # (a random draw equal to the original is rare)
    assert torch.equal(inputs[~selected], tokens[~selected])
    assert tokens[0, 0] == 1  # the input tensor is not modified


def test_mask_tokens_is_seeded_and_validates():
    t = torch.randint(5, 50, (4, 32))
    a = mask_tokens(t, MASK, 50, SPECIAL, generator=torch.Generator().manual_seed(3))
    b = mask_tokens(t, MASK, 50, SPECIAL, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    with pytest.raises(UserError, match="0.15"):
        mask_tokens(t, MASK, 50, prob=1.5)


def _tiny_bert():
    cfg = get_preset("bert-base", vocab_size=64, dim=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=32,
                     dropout=0.0)
    return build_model(cfg, seed=0)


@pytest.fixture
def one_thread():
    """Tiny models train much faster on one thread when the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _constant_rows_shards(d, rows: dict[str, int], seq_len: int, vocab: int, seed: int = 0):
    """A token-shard dir whose every window (``seq_len`` tokens, aligned) repeats one random id in
    [5, vocab): the MLM rows of the loader are constant rows."""
    import numpy as np

    from tests.unit.test_loader import write_shards

    g = np.random.default_rng(seed)
    splits = {split: [np.append(np.repeat(g.integers(5, vocab, n), seq_len), 5)] for split, n in rows.items()}
    return write_shards(d, splits, vocab=vocab)


def test_mlm_training_from_scratch_learns_to_fill_masks(one_thread, tmp_path):
    """BERT pretraining through the production path: tasks.run() with train.objective=mlm (the MLM head
    attached to the encoder, mlm_objective's masks, the Trainer, RUN/model with its heads). Each row
    repeats one random token: its marginal is uniform over 59 ids (best context-free loss ln 59 = 4.08),
    but a model that reads the unmasked neighbours can fill every mask."""
    import json

    from lmforge.artifacts.heads_dir import load_heads
    from lmforge.artifacts.model_dir import load_model_dir
    from lmforge.config import from_dict
    from lmforge.tasks.run import run
    from lmforge.train.config import PretrainConfig

    T, V, steps = 16, 64, 80
    data = _constant_rows_shards(tmp_path / "shards", {"train": steps * 16, "val": 64}, T, V)
    cfg = from_dict(PretrainConfig, {
        "run": {"dir": str(tmp_path / "run")},
        "model": {"preset": "bert-base", "dim": 32, "n_layers": 2, "n_heads": 4, "ffn_hidden": 64,
                  "max_seq_len": T, "dropout": 0.0},
        "data": {"dir": str(data), "seq_len": T},
        "train": {"global_batch": 16, "micro_batch": 16, "max_steps": steps, "objective": "mlm", "device": "cpu"},
        "optim": {"lr": 1e-2, "weight_decay": 0.01},
        "schedule": {"name": "constant"},
        "eval": {"interval": steps, "batches": 4},
        "checkpoint": {"interval": 0},
        "log": {"interval": 10, "progress": False},
    })
    result = run(cfg).train
    assert result.step == steps and result.stop_reason == "max_steps"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"]
    assert evals[0][0] == 0 and evals[-1][0] == steps, evals
    assert evals[0][1] > 4.0 and evals[-1][1] < 3.3, evals
    # RUN/model: the encoder (one extra id, the mask) and its MLM head; it fills masks in new rows
    model_dir = tmp_path / "run" / "model"
    assert read_metadata(model_dir).heads == ["mlm"]
    model = load_model_dir(model_dir).eval()
    assert model.cfg.vocab_size == V + 1
    head = load_heads(model_dir, model.cfg)["mlm"]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(5, V, (128, 1), generator=g).expand(128, T).clone()
    inputs = tokens.clone()
    at = [2, 7, 11]
    inputs[:, at] = V  # the mask id: one after the data's vocabulary
    with torch.no_grad():
        logits = mlm_logits(model, head, inputs)[:, at]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, at].flatten()).item()
    filled = (logits.argmax(-1) == tokens[:, at]).float().mean().item()
    assert loss < 3.3 and filled > 0.1, (loss, filled)  # chance: ln 59 = 4.08 and 1/59 = 0.017


def test_heads_save_and_load(tmp_path):
    import json

    model = _tiny_bert()
    heads = {"mlm": MLMHead(model.cfg), "pooler": Pooler(model.cfg)}
    heads["mlm"].init_weights(torch.Generator().manual_seed(1))
    save_heads(heads, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"heads": ["mlm", "pooler"]}))
    back = load_heads(tmp_path, model.cfg)
    for name, head in heads.items():
        for k, v in head.state_dict().items():
            assert torch.equal(back[name].state_dict()[k], v)
    (tmp_path / "config.json").write_text(json.dumps({"heads": ["nsp"]}))
    with pytest.raises(UserError, match="unknown head 'nsp'"):
        load_heads(tmp_path, model.cfg)


def test_resize_keeps_old_bias():
    head = MLMHead(_tiny_bert().cfg)
    with torch.no_grad():
        head.bias.copy_(torch.arange(64.0))
    head.resize(70)
    assert torch.equal(head.bias[:64], torch.arange(64.0)) and torch.equal(head.bias[64:], torch.zeros(6))
