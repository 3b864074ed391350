"""The model side of `lmforge serve`: paged KV cache, continuous batching and streaming detokenization,
without HTTP. Served in a batch that sequences join and leave, every sequence must produce what it
produces alone (paging, chunked prefill, prefix sharing and preemption: tests/unit/test_paged_kv.py)."""

import pytest
import torch

from lmforge.generate.batcher import ContinuousBatcher, SamplingParams, Sequence
from lmforge.generate.engine import cut_at_stop, generate
from lmforge.generate.paged import PagedKVCache
from lmforge.generate.text_stream import TextStream
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import build_model

PROMPTS = [[5, 6], [7, 8, 9, 10, 11, 12], [1], [3] * 13, [40, 2, 17]]


def tiny(**kw):
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64, **kw)
    return build_model(cfg, seed=0).eval()


def run_staggered(batcher, seqs):
    """Sequence i joins after i decode steps (when a slot is free); run until every one has finished."""
    waiting, joined, step = list(seqs), 0, 0
    while waiting or batcher.active:
        while waiting and batcher.free_slots and step >= joined:
            batcher.add(waiting.pop(0))
            joined += 1
        batcher.step()
        step += 1


@pytest.mark.parametrize("variant", [{}, {"sliding_window": 6}, {"pos_encoding": "learned"}],
                         ids=["rope", "sliding-window", "learned-positions"])
def test_greedy_in_a_changing_batch_equals_alone(variant):
    model = tiny(**variant)
    batcher = ContinuousBatcher(model, n_slots=3)  # 5 sequences over 3 slots: some wait for a free one
    seqs = [Sequence(p, SamplingParams(max_new_tokens=12 + 3 * i)) for i, p in enumerate(PROMPTS)]
    run_staggered(batcher, seqs)
    for s, p in zip(seqs, PROMPTS):
        assert s.finish_reason == "length"
        assert s.out == generate(model, p, max_new_tokens=s.params.max_new_tokens)
    assert batcher.free_slots == 3 and batcher.cache.available == batcher.cache.n_blocks


@pytest.mark.parametrize("window", [None, 4], ids=["left-aligned", "right-aligned"])
@pytest.mark.parametrize("order", [[0, 1], [1, 0]], ids=["in-order", "shuffled"])
def test_decode_view_logits_equal_full_recompute(order, window):
    model = tiny(sliding_window=window)
    cache = PagedKVCache(model.cfg, n_blocks=8, block_size=4)
    prompts = {0: [4, 9, 1, 30, 22, 7], 1: [13, 5]}
    tables = {0: [5, 2], 1: [6]}  # blocks out of order: rows are gathered through the tables
    for s, p in prompts.items():
        model(torch.tensor([p]), cache=cache.prefill(tables[s], 0, len(p)))
    new = {0: 3, 1: 8}
    view = cache.decode([tables[s] for s in order], [len(prompts[s]) for s in order])
    assert view.key_mask.shape == (2, 1, 1, 7) and view.key_mask.sum() == 3 + 7
    logits = model(torch.tensor([[new[s]] for s in order]), positions=view.pos[:, None], mask=view.key_mask,
                   cache=view)[:, -1]
    for row, s in enumerate(order):
        full = model(torch.tensor([prompts[s] + [new[s]]]))[0, -1]
        torch.testing.assert_close(logits[row], full, rtol=1e-5, atol=1e-5)


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = tiny()
    kw = {"max_new_tokens": 15, "temperature": 1.3, "top_p": 0.9}
    alone = ContinuousBatcher(model, n_slots=1)
    ref = Sequence([1, 2, 3], SamplingParams(seed=11, **kw))
    alone.add(ref)
    while alone.active:
        alone.step()
    batched = ContinuousBatcher(model, n_slots=4)
    seqs = [Sequence([1, 2, 3], SamplingParams(seed=11, **kw)), Sequence([1, 2, 3], SamplingParams(seed=12, **kw)),
            Sequence([9, 9], SamplingParams(**kw)), Sequence([5], SamplingParams(max_new_tokens=20))]
    run_staggered(batched, seqs[::-1])  # the seeded one joins last, into a running batch
    assert seqs[0].out == ref.out
    assert seqs[1].out != ref.out  # another seed, another sample


def test_stop_ids_end_a_sequence_and_remove_frees_its_slot():
    model = tiny()
    free = generate(model, [4, 4, 4], max_new_tokens=10)
    batcher = ContinuousBatcher(model, n_slots=2)
    stopped = Sequence([4, 4, 4], SamplingParams(max_new_tokens=10, stop_ids=frozenset([free[3]])))
    left = Sequence([7, 7], SamplingParams(max_new_tokens=50))
    batcher.add(stopped)
    batcher.add(left)
    for _ in range(6):
        batcher.step()
    assert stopped.finish_reason == "stop" and stopped.out == free[: free.index(free[3])]
    assert batcher.active == [left] and batcher.free_slots == 1 and left.blocks
    batcher.remove(left)
    assert left.finish_reason == "cancelled" and batcher.free_slots == 2 and batcher.step() == []
    assert batcher.cache.available == batcher.cache.n_blocks and not left.blocks


class ByteTok:
    """Token id = one UTF-8 byte, so a Chinese character takes three tokens (the half-character case)."""

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("stops", [(), ("世界",), ("lo w", "zz"), ("o",)])
def test_text_stream_deltas_add_up_to_the_cut_text(stops):
    tok = ByteTok()
    text = "hello world, 你好世界, bye"
    stream, deltas = TextStream(tok, stops), []
    for t in tok.encode(text):
        deltas.append(stream.push(t))
        assert "\ufffd" not in deltas[-1]  # never half a character
        assert not any(s in "".join(deltas) for s in stops)  # never the stop string itself
        if stream.stopped:
            break
    deltas.append(stream.flush())
    assert "".join(deltas) == cut_at_stop(text, stops)
    assert stream.stopped == any(s in text for s in stops)
