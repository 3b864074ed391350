"""A faster step: the attention mask is built once per forward (not per layer), and the training step reads
device values back a fixed number of times, however many micro-batches it runs."""

from __future__ import annotations

import torch
from test_trainer import CountingSource, make_cfg, make_trainer

from lmforge.models import transformer
from lmforge.models.config import ModelConfig
from lmforge.models.masks import StepMask
from lmforge.models.transformer import build_model
from lmforge.train.batches import count_input_tokens, input_tokens


def test_the_mask_is_built_once_per_forward_and_gives_the_per_layer_result(monkeypatch):
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=3, n_heads=2, ffn_hidden=32, max_seq_len=16,
                      sliding_window=5)
    model = build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    docs = torch.tensor([0] * 5 + [1] * 7)
    mask = (docs[:, None] == docs[None, :])[None, None].expand(2, 1, 12, 12)  # two documents per row
    calls = []
    real = transformer.attention_mask
    monkeypatch.setattr(transformer, "attention_mask", lambda *a, **k: calls.append(a) or real(*a, **k))
    with torch.no_grad():
        got = model(tokens, mask=mask)
    assert len(calls) == 1  # one mask for the 3 layers
    # the per-layer way: each layer folds causality, window and the caller's mask itself
    calls.clear()
    with torch.no_grad():
        h = model.tok_embeddings(tokens)
        rope = transformer.rope_cos_sin(model.rope_inv_freq, torch.arange(12).expand(2, 12), h.dtype)
        for layer in model.layers:
            h = layer(h, rope, mask, None)
        want = model.output(model.norm(h))
    assert len(calls) == cfg.n_layers
    torch.testing.assert_close(got, want)
    # the mask every layer got: one explicit bool mask (not SDPA's causal flag) of causality, the window of 5
    # and the two documents, position by position
    built = StepMask(*real(12, 12, window=5, mask=mask))
    assert built.is_causal is False and built.attn_mask.dtype == torch.bool
    t, s = torch.arange(12)[:, None], torch.arange(12)[None, :]
    allowed = (s <= t) & (s > t - 5) & (docs[:, None] == docs[None, :])
    assert torch.equal(built.attn_mask.expand(2, 1, 12, 12), allowed.expand(2, 1, 12, 12))


def test_input_token_count_stays_on_the_device():
    batch = {"tokens": torch.zeros(3, 9, dtype=torch.long), "input_tokens": torch.tensor([4, 8, 2])}
    count = count_input_tokens(batch)
    assert torch.is_tensor(count) and int(count) == 14 == input_tokens(batch)
    assert count_input_tokens(torch.zeros(3, 9, dtype=torch.long)) == 24


class DictSource(CountingSource):
    """Causal rows as dict batches with a per-row real-input count (the SFT shape of a batch)."""

    def next_batch(self):
        tokens = super().next_batch()
        return {"tokens": tokens, "input_tokens": torch.full((tokens.size(0),), tokens.size(1) - 1)}


def _reads_per_step(tmp_path, micro, monkeypatch):
    cfg = make_cfg(tmp_path / f"m{micro}", train={"micro_batch": micro, "max_steps": 2},
                   eval={"at_start": False, "batches": 0})
    trainer = make_trainer(cfg, source=DictSource())
    trainer.model.train()
    trainer.train_step(trainer.train_batches.next_batch())  # warm-up (optimizer state is created here)
    counter = {"n": 0}
    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__float__", "__int__", "__bool__"):
            orig = getattr(torch.Tensor, name)

            def wrapped(self, *a, _orig=orig, **k):
                counter["n"] += 1
                return _orig(self, *a, **k)

            m.setattr(torch.Tensor, name, wrapped)
        out = trainer.train_step(trainer.train_batches.next_batch())
    assert out["tokens"] == 8 * 16 and out["loss_tokens"] == 8 * 16
    return counter["n"]


def test_the_step_reads_back_the_same_number_of_times_for_1_or_4_micro_batches(tmp_path, monkeypatch):
    one = _reads_per_step(tmp_path, 8, monkeypatch)
    four = _reads_per_step(tmp_path, 2, monkeypatch)
    assert four == one, (one, four)  # nothing per micro-batch: sums stay on the device until the step's end
    assert one <= 4, one
