"""`attention_mask` against a brute-force reference: every (query, key) pair decided by the definitions."""

from __future__ import annotations

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
