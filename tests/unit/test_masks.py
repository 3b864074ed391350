"""`attention_mask` against a brute-force reference: every (query, key) pair decided by the definitions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lmforge.models.attention import reference_attention, sdpa_attention
from lmforge.models.masks import attention_mask, materialize


def brute_force(q_len, k_len, causal, window, mask):
    """allowed[b, h, t, s] from the definitions, one pair at a time."""
    offset = k_len - q_len  # query t is key position offset + t
    b, h = (mask.shape[0], mask.shape[1]) if mask is not None else (1, 1)
    out = torch.zeros(b, h, q_len, k_len, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for t in range(q_len):
                for s in range(k_len):
                    ok = True
                    if causal:
                        ok = s <= offset + t and (window is None or offset + t - s < window)
                    if mask is not None:
                        ok = ok and bool(mask[bi, hi, t, s])
                    out[bi, hi, t, s] = ok
    return out


@st.composite
def cases(draw):
    q_len = draw(st.integers(1, 7))
    cached = draw(st.integers(0, 6))
    k_len = q_len + cached
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.integers(1, 9)))
    mask = None
    if draw(st.booleans()):
        b, h = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
        bits = draw(st.lists(st.booleans(), min_size=b * h * q_len * k_len, max_size=b * h * q_len * k_len))
        mask = torch.tensor(bits, dtype=torch.bool).view(b, h, q_len, k_len)
    return q_len, k_len, causal, window, mask


@settings(max_examples=300, deadline=None)
@given(cases())
def test_mask_equals_brute_force(case):
    q_len, k_len, causal, window, mask = case
    got, is_causal = attention_mask(q_len, k_len, causal=causal, window=window, mask=mask)
    want = brute_force(q_len, k_len, causal, window, mask)
    full = materialize(got, is_causal, q_len, k_len)
    assert torch.equal(full.expand_as(want), want)
    if is_causal:  # the fused path is taken only where top-left causal alignment is the right one
        assert causal and mask is None and q_len == k_len and got is None


def test_fast_path_is_taken_when_it_is_exact():
    assert attention_mask(8, 8) == (None, True)
    assert attention_mask(8, 8, window=8) == (None, True)
    assert attention_mask(8, 8, window=3)[1] is False  # the window binds: explicit mask
    assert attention_mask(1, 8)[1] is False  # decoding with a cache: offset causality
    m = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    assert attention_mask(4, 4, causal=False, mask=m) == (m, False)  # encoders: the caller's mask as is
    assert attention_mask(4, 4, causal=False) == (None, False)


@settings(max_examples=80, deadline=None)
@given(cases(), st.integers(0, 2**31 - 1))
def test_fused_attention_with_the_mask_equals_the_written_out_formula(case, seed):
    q_len, k_len, causal, window, mask = case
    want = brute_force(q_len, k_len, causal, window, mask)
    assume(bool(want.any(-1).all()))  # a query with no key to attend has no softmax
    g = torch.Generator().manual_seed(seed)
    b = want.shape[0]
    q = torch.randn(b, 2, q_len, 8, generator=g, dtype=torch.float64)  # 2 query heads share 1 KV head
    k, v = (torch.randn(b, 1, k_len, 8, generator=g, dtype=torch.float64) for _ in range(2))
    got, is_causal = attention_mask(q_len, k_len, causal=causal, window=window, mask=mask)
    out = sdpa_attention(q, k, v, got, is_causal)
    # torch's CPU fused kernel drifts up to ~1.3e-7 from the float64 formula on some inputs (e.g. q_len 4, k_len 10,
    # no mask, seed 4), past float64's default 1e-7; a wrong mask moves outputs by ~0.1
    torch.testing.assert_close(out, reference_attention(q, k, v, want), rtol=1e-6, atol=1e-6)


# ---- document masks built from doc ids on the device; FlexAttention block masks -------------------------
def _doc_ids():
    return torch.tensor([[0] * 5 + [1] * 7 + [2] * 4, [0] * 16, [0] * 9 + [-1] * 7])  # (3, 16); -1 = padding


@pytest.mark.parametrize("window", [None, 3])
def test_block_mask_stands_for_the_dense_document_mask(window):
    from lmforge.models.masks import dense_from_block_mask, document_block_mask, document_mask_dense

    doc = _doc_ids()
    want = document_mask_dense(doc) & materialize(*attention_mask(16, 16, window=window), 16, 16)
    got = dense_from_block_mask(document_block_mask(doc, causal=True, window=window, compile=False))
    assert torch.equal(got, want)
    assert attention_mask(16, 16, mask=document_block_mask(doc, compile=False))[1] is False


@pytest.mark.parametrize("kernel", ["sdpa", "reference"])
def test_flex_forward_matches_the_dense_mask_path(kernel):
    """The CUDA path (a BlockMask through FlexAttention) and the CPU path (the dense bool mask through SDPA)
    give the same logits — forward only: FlexAttention has no CPU backward."""
    from lmforge.models.attention import use_attention_kernel
    from lmforge.models.config import ModelConfig
    from lmforge.models.masks import document_attention_mask
    from lmforge.models.transformer import build_model

    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=16)
    model = use_attention_kernel(build_model(cfg, seed=0).eval(), kernel)
    doc = _doc_ids()
    tokens = torch.randint(0, 50, doc.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(tokens, mask=document_attention_mask(doc, use_flex=False))
        flex = model(tokens, mask=document_attention_mask(doc, use_flex=True))
    assert document_attention_mask(doc).dtype == torch.bool  # CPU default: the dense mask
    torch.testing.assert_close(flex, dense, atol=2e-5, rtol=1e-5)


def test_batches_carry_doc_ids_and_the_loss_builds_the_mask_on_their_device():
    """Pretraining and packed SFT batches hold (B, T) doc ids, not a (B, 1, T, T) mask; the loss with
    ``doc_ids`` equals the loss with the dense mask passed in."""
    from lmforge.data.loader import document_mask
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model
    from lmforge.tasks.pretrain import PretrainBatches
    from lmforge.train.losses import causal_lm_loss, next_token_loss

    cfg = ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, 50, (2, 17), generator=torch.Generator().manual_seed(1))
    doc = torch.tensor([[0] * 6 + [1] * 11, [0] * 3 + [1] * 3 + [2] * 11])
    batch = PretrainBatches.convert((tokens, doc))
    assert "mask" not in batch and batch["doc_ids"].shape == (2, 16)
    loss, n = causal_lm_loss(model, batch)
    want = next_token_loss(model, tokens[:, :-1], tokens[:, 1:], positions=batch["positions"],
                           mask=document_mask(doc[:, :-1]))
    assert int(n) == 32
    torch.testing.assert_close(loss, want)
