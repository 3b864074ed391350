"""The Transformer held to the formulas: attention, positions, GQA, causality, KV cache."""

import math

import pytest
import torch

from lmforge.generate.kv_cache import KVCache
from lmforge.models.attention import reference_attention, use_attention_kernel
from lmforge.models.config import ModelConfig
from lmforge.models.positional import sinusoidal_table
from lmforge.models.transformer import build_model

torch.manual_seed(0)


def tiny(**kw):
    base = dict(vocab_size=97, dim=32, n_layers=2, n_heads=4, ffn_hidden=64, max_seq_len=64)
    base.update(kw)
    return ModelConfig(**base)


POS_KINDS = [
    dict(pos_encoding="rope"),
    dict(pos_encoding="rope", rope_scaling=dict(factor=8.0, original_max_seq_len=16)),
    dict(pos_encoding="learned", activation="gelu_tanh", norm="layernorm", bias=True, tie_embeddings=True),
    dict(pos_encoding="sinusoidal", activation="relu", norm="layernorm", norm_position="post", embed_scale=True),
    dict(pos_encoding="none", activation="gelu"),
    dict(pos_encoding="rope", n_kv_heads=2, qkv_bias=True),
    dict(pos_encoding="rope", n_kv_heads=1),
]


def test_sinusoidal_matches_formula():
    table = sinusoidal_table(50, 16)
    for pos in (0, 1, 7, 49):
        for i in range(8):
            angle = pos / (10000 ** (2 * i / 16))
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_reference_attention_is_the_formula_and_sdpa_agrees():
    q, k, v = (torch.randn(2, 3, 5, 8) for _ in range(3))
    scores = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(8)
    want = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(reference_attention(q, k, v), want)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(reference_attention(q, k, v, is_causal=True), sdpa, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kw", POS_KINDS)
def test_reference_model_equals_sdpa_model(kw):
    cfg = tiny(**kw)
    m = build_model(cfg, seed=1).eval()
    ref = use_attention_kernel(build_model(cfg, init=False), "reference").eval()
    ref.load_state_dict(m.state_dict())
    assert {type(a.kernel) for a in ref.modules() if hasattr(a, "kernel")} == {type(reference_attention)}
    assert all(a.kernel is reference_attention for a in ref.modules() if hasattr(a, "kernel"))
    x = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", POS_KINDS)
def test_causality(kw):
    m = build_model(tiny(**kw), seed=2).eval()
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 97
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=0, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_bidirectional_encoder_sees_the_future():
    m = build_model(tiny(causal=False, lm_head=False, pos_encoding="learned"), seed=2).eval()
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 97  # another id, still inside the vocabulary
    assert not torch.allclose(m(x)[:, :10], m(y)[:, :10])


@pytest.mark.parametrize("kw", POS_KINDS)
def test_cached_decode_equals_full_recompute(kw):
    m = build_model(tiny(**kw), seed=3).eval()
    x = torch.randint(0, 97, (2, 20))
    full = m(x)
    cache = KVCache(m.cfg, batch_size=2, max_len=20)
    parts = [m(x[:, :7], cache=cache)]  # prefill
    parts.append(m(x[:, 7:12], cache=cache))  # a chunk after cached tokens
    for t in range(12, 20):  # one token at a time
        parts.append(m(x[:, t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = build_model(tiny(n_kv_heads=2), seed=4).eval()
    mha = build_model(tiny(), init=False).eval()
    sd = gqa.state_dict()
    hd = 8
    for i in range(2):
        for name in ("wk", "wv"):
            w = sd[f"layers.{i}.attention.{name}.weight"].view(2, hd, 32)  # (kv_heads, d, dim)
            sd[f"layers.{i}.attention.{name}.weight"] = w.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-5, rtol=1e-5)


def test_positions_and_mask_for_left_padding_match_unpadded():
    m = build_model(tiny(), seed=5).eval()
    x = torch.randint(1, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    valid = torch.tensor([[False] * 3 + [True] * 6])
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = valid[:, None, None, :] | torch.eye(9, dtype=torch.bool)[None, None]
    out = m(padded, positions=positions, mask=mask)[:, 3:]
    torch.testing.assert_close(out, m(x), atol=1e-5, rtol=1e-5)


def test_init_is_depth_scaled_and_seeded():
    a = build_model(tiny(n_layers=8), seed=7)
    b = build_model(tiny(n_layers=8), seed=7)
    torch.testing.assert_close(a.layers[0].attention.wq.weight, b.layers[0].attention.wq.weight)
    wq = a.layers[0].attention.wq.weight.std().item()
    wo = a.layers[0].attention.wo.weight.std().item()
    assert wo / wq == pytest.approx(1 / math.sqrt(16), rel=0.15)


def test_backward_runs_and_dropout_is_active_in_train_mode():
    m = build_model(tiny(dropout=0.5), seed=8)
    x = torch.randint(0, 97, (2, 8))
    m.train()
    assert not torch.allclose(m(x), m(x))
    loss = m(x).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for p in m.parameters())
