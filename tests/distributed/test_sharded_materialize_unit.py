"""The pieces of sharded materialization that need no process group: streamed init equals torch's
`trunc_normal_` on the whole tensor (any chunking, any slice), run splitting, meta -> materialize."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lmforge.distributed.materialize as m


@pytest.mark.parametrize("shape,chunk_rows", [((1000, 256), 37), ((96, 208), 5), ((50, 32), 50), ((7, 16), 1)])
def test_streamed_trunc_normal_equals_one_whole_draw(monkeypatch, shape, chunk_rows):
    monkeypatch.setattr(m, "_CHUNK_ELEMENTS", chunk_rows * shape[1])
    g = torch.Generator().manual_seed(3)
    full = torch.empty(shape)
    nn.init.trunc_normal_(full, mean=0.0, std=0.02, a=-0.06, b=0.06, generator=g)
    after = torch.rand(4, generator=g)  # the generator must end where the whole draw leaves it
    rows = torch.cat([torch.arange(1, shape[0], 3), torch.arange(0, shape[0], 3)]).sort().values
    cols = torch.arange(shape[1] // 2, shape[1])
    for idx in ([torch.arange(shape[0]), torch.arange(shape[1])], [rows, cols]):
        g2 = torch.Generator().manual_seed(3)
        local = torch.empty(len(idx[0]), len(idx[1]))
        m._stream_trunc_normal(shape, idx, local, 0.02, g2)
        assert torch.equal(local, full[idx[0]][:, idx[1]])
        assert torch.equal(torch.rand(4, generator=g2), after)


def test_runs_split_indices_into_contiguous_ranges():
    assert m.runs(torch.tensor([0, 1, 2, 5, 6, 9])) == [(0, 3), (5, 7), (9, 10)]
    assert m.runs(torch.tensor([4, 5, 6, 7])) == [(4, 8)]
    assert m.runs(torch.tensor([], dtype=torch.long)) == []
    t = torch.arange(60.0).view(6, 10)
    idx = [torch.tensor([0, 1, 4]), torch.tensor([2, 3, 7])]
    assert torch.equal(m.read_block(lambda s: t[s], [m.runs(i) for i in idx]), t[idx[0]][:, idx[1]])


def test_meta_model_materializes_to_the_seeded_init_in_one_process():
    from lmforge.models.presets import model_config_from_dict
    from lmforge.models.transformer import Transformer, build_model

    cfg = model_config_from_dict({"vocab_size": 96, "dim": 32, "n_layers": 2, "n_heads": 4, "ffn_hidden": 64,
                                  "max_seq_len": 16, "tie_embeddings": True, "bias": True})
    with torch.device("meta"):
        model = Transformer(cfg)
    m.attach_weights(model, m.ShardedInit(5))
    assert m.is_meta(model)
    m.materialize(model, "cpu")
    ref = build_model(cfg, seed=5)
    assert not m.is_meta(model) and model.output.weight is model.tok_embeddings.weight
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    tokens = torch.randint(0, 96, (2, 8))
    assert torch.equal(model(tokens), ref(tokens))  # buffers (RoPE) rebuilt too
