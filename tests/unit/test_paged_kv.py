"""The serving engine's paged KV cache: blocks from a pool, chunked prefill, prefix sharing by block hash,
preemption when the pool runs out. With every feature on, each greedy request must produce exactly what it
produces alone and what `generate()` produces."""

import pytest
import torch

from lmforge.config import UserError
from lmforge.generate.batcher import ContinuousBatcher, SamplingParams, Sequence
from lmforge.generate.engine import generate
from lmforge.generate.kv_cache import kv_bytes_per_token, paged_cache_plan
from lmforge.generate.paged import PagedKVCache, PoolExhausted, block_hash
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import build_model


def tiny(**kw):
    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=96, **kw)
    return build_model(cfg, seed=0).eval()


def drain(batcher, arrivals):
    """``arrivals``: {step: [sequences]} joining at that step; run until every sequence has finished."""
    step = 0
    while any(k >= step for k in arrivals) or batcher.active:
        for s in arrivals.get(step, []):
            batcher.add(s)
        batcher.step()
        step += 1
        assert step < 2000


def check_against_generate(model, seqs):
    for s in seqs:
        assert s.finish_reason == "length", s.finish_reason
        assert s.out == generate(model, s.prompt, max_new_tokens=s.params.max_new_tokens), s.prompt


@pytest.mark.parametrize("variant", [{}, {"sliding_window": 7}, {"pos_encoding": "learned"}],
                         ids=["rope", "sliding-window", "learned-positions"])
def test_paging_chunking_and_prefix_sharing_keep_greedy_output(variant):
    model = tiny(**variant)
    system = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]  # shared by most requests: 2 full blocks of 4
    prompts = [system + [1, 2], system + [3], [7, 8, 9], system + [4, 5, 6, 7, 8, 9, 10], [30] * 37,
               system + [1, 2], [2] * 5, system + list(range(21, 50))]
    seqs = [Sequence(p, SamplingParams(max_new_tokens=6 + 2 * i)) for i, p in enumerate(prompts)]
    batcher = ContinuousBatcher(model, n_slots=4, block_size=4, prefill_chunk=8)
    # long prompts (37 and 39 tokens: 5 chunks) arrive while others are decoding
    drain(batcher, {0: seqs[:3], 2: seqs[3:5], 5: seqs[5:7], 9: seqs[7:]})
    check_against_generate(model, seqs)
    assert batcher.cache.hits > 0  # the shared system prompt was reused, not recomputed
    assert batcher.cache.available == batcher.cache.n_blocks and all(r == 0 for r in batcher.cache.refs)


@pytest.mark.parametrize("variant", [{}, {"sliding_window": 7}, {"pos_encoding": "learned"}],
                         ids=["rope", "sliding-window", "learned-positions"])
def test_prompts_arriving_together_are_prefilled_in_one_padded_forward_with_the_same_output(variant):
    model = tiny(**variant)
    prompts = [[5, 6, 7], [9] * 13, [1], list(range(20, 45)), [3, 4], [8, 7, 6, 5, 4, 3, 2, 1, 0, 1, 2]]
    seqs = [Sequence(p, SamplingParams(max_new_tokens=5 + i)) for i, p in enumerate(prompts)]
    batcher = ContinuousBatcher(model, n_slots=6, block_size=4, prefill_chunk=32)
    fresh = []
    original = batcher._prefill_fresh
    batcher._prefill_fresh = lambda plan: fresh.append([n for _, n in plan]) or original(plan)
    drain(batcher, {0: seqs[:4], 3: seqs[4:]})  # the 25-token prompt is cut by the 32-token budget
    check_against_generate(model, seqs)
    assert fresh[:2] == [[3, 13, 15], [2, 11]]  # one forward per step (the 1-token prompt decodes at once)
    assert batcher.cache.available == batcher.cache.n_blocks


def test_a_shared_prefix_across_50_requests_is_computed_once():
    model = tiny()
    system = [(7 * i) % 61 for i in range(1, 34)]  # 33 tokens: 8 full blocks of 4, then the suffixes
    seqs = [Sequence(system + [i % 61, (3 * i) % 61], SamplingParams(max_new_tokens=4)) for i in range(50)]
    batcher = ContinuousBatcher(model, n_slots=8, block_size=4)
    prefill_tokens = []
    model.register_forward_pre_hook(lambda m, args: prefill_tokens.append(args[0].shape[1])
                                    if args[0].shape[1] > 1 else None)
    drain(batcher, {0: seqs[:1], 1: seqs[1:]})
    computed = list(prefill_tokens)
    check_against_generate(model, seqs[:10] + seqs[-3:])  # (the rest: the same code path, checked below)
    alone = ContinuousBatcher(model, n_slots=1, prefix_cache=False)
    for s in seqs[10:-3]:
        ref = Sequence(s.prompt, s.params)
        drain(alone, {0: [ref]})
        assert ref.out == s.out
    # the first request computes all 35 prompt tokens; each later one only what follows the 8 shared blocks
    assert batcher.cache.hits == 49 * 8
    assert computed[0] == 35 and max(computed[1:]) == 3
    assert batcher.cache.available == batcher.cache.n_blocks


def test_preemption_under_a_tiny_pool_recomputes_and_keeps_output():
    model = tiny()
    # a pool of 8 blocks x 4 tokens = one 32-token sequence; four sequences want ~20-30 tokens each
    batcher = ContinuousBatcher(model, n_slots=4, max_len=32, kv_blocks=8, block_size=4, prefill_chunk=6)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8], [1, 4, 1, 4, 2, 1, 3, 5, 6, 2], [5, 5, 5]]
    seqs = [Sequence(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, [20, 22, 18, 25])]
    drain(batcher, {0: seqs[:2], 3: seqs[2:]})
    assert batcher.preemptions > 0 and any(s.preemptions for s in seqs)
    check_against_generate(model, seqs)
    assert batcher.cache.available == 8


def test_chunked_prefill_bounds_the_work_of_a_step_and_streams_keep_their_pace():
    model = tiny()
    batcher = ContinuousBatcher(model, n_slots=4, block_size=4, prefill_chunk=10)
    running = [Sequence([i + 1, 2, 3], SamplingParams(max_new_tokens=40)) for i in range(3)]
    for s in running:
        batcher.add(s)
    batcher.step()
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].numel()))
    long = Sequence([9] * 80, SamplingParams(max_new_tokens=3))
    batcher.add(long)
    steps_until_first_token = 0
    while not long.out:
        updates = batcher.step()
        steps_until_first_token += 1
        assert {id(u.seq) for u in updates} >= {id(s) for s in running}  # every stream got a token this step
    per_step = [sizes[i] + sizes[i + 1] for i in range(0, len(sizes), 2)]  # decode rows + the prompt chunk
    assert steps_until_first_token == 12 and max(per_step) <= 10  # 80 tokens in chunks of 10 - 3 decode rows
    while batcher.active:
        batcher.step()
    check_against_generate(model, running + [long])


def test_block_pool_refcounts_and_lru_eviction():
    cache = PagedKVCache(tiny().cfg, n_blocks=3, block_size=2)
    a, b = cache.allocate(), cache.allocate()
    ha, hb = block_hash(b"", [1, 2]), block_hash(block_hash(b"", [1, 2]), [3, 4])
    cache.register(a, ha)
    cache.register(b, hb)
    assert cache.lookup(ha) == a and cache.refs[a] == 2  # shared: two holders
    cache.release([a, b])
    assert cache.available == 2 and cache.refs == [1, 0, 0]  # b cached at 0 refs; a still held once
    cache.release([a])
    assert cache.available == 3
    c = cache.allocate()  # the never-used block goes first; cached ones stay
    assert c not in (a, b) and cache.lookup(hb) == b
    cache.release([b])
    d = cache.allocate()  # then the least recently used cached block: a (b was used after it)
    assert d == a and cache.lookup(ha) is None and cache.refs[a] == 1
    e = cache.allocate()
    assert e == b and cache.lookup(hb) is None
    with pytest.raises(PoolExhausted):
        cache.allocate()
    assert block_hash(b"", [1, 2]) != block_hash(b"", [12]) != block_hash(b"x", [1, 2])  # ids kept apart


def test_serving_cache_is_sized_by_memory_and_refused_in_one_line(monkeypatch):
    from lmforge.generate import kv_cache
    from lmforge.models.presets import get_preset

    cfg = get_preset("llama3.1-8b")  # 131,072 context, 128 KiB of keys and values per token in bf16
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 2 * 32 * 8 * 128 * 2
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(kv_cache, "available_memory", lambda d: (64 * 2**30, "the 64.0 GiB available"))
    # by default the pool is the 4 GiB CPU cap; one sequence may take all of it: 32,768 tokens
    assert paged_cache_plan(cfg, 8, None, None, 16, cpu, torch.bfloat16) == (32768, 2048)
    assert paged_cache_plan(cfg, 8, 1000, None, 16, cpu, torch.bfloat16) == (1000, 8 * 63)  # 8 x 1000 tokens
    # --max-batch 100000000 (issue 22: a 13 TB allocation) is the same 4 GiB pool, not a traceback
    assert paged_cache_plan(cfg, 10**8, 1000, None, 16, cpu, torch.bfloat16) == (1000, 2048)
    assert paged_cache_plan(cfg, 8, None, 1.0, 16, cpu, torch.bfloat16) == (8192, 512)
    with pytest.raises(UserError, match=r"^--kv-cache-gb 100 is over the 64.0 GiB available; pass at most 64.0$"):
        paged_cache_plan(cfg, 8, None, 100, 16, cpu, torch.bfloat16)
    with pytest.raises(UserError, match=r"holds 8192 tokens, less than one 100000-token sequence; pass a larger "
                                        r"--kv-cache-gb or a smaller --max-context"):
        paged_cache_plan(cfg, 8, 100000, 1.0, 16, cpu, torch.bfloat16)
    monkeypatch.setattr(kv_cache, "available_memory", lambda d: (20 * 2**30, f"the 20.0 GiB free on {d}"))
    assert paged_cache_plan(cfg, 8, None, None, 16, cuda, torch.bfloat16) == (131072, 8192)  # 16 GiB pool
    monkeypatch.setattr(kv_cache, "available_memory", lambda d: (2**28, f"the 0.2 GiB free on {d}"))
    with pytest.raises(UserError, match="holds 1632 tokens, less than one 131072-token sequence"):
        paged_cache_plan(cfg, 8, 131072, None, 16, cuda, torch.bfloat16)
    small = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)
    assert paged_cache_plan(small, 8, None, None, 16, cpu, torch.float32) == (64, 32)  # the model's own context


def test_server_threads_leave_one_core_to_the_http_side(monkeypatch):
    import os

    from lmforge.generate.batcher import serving_threads

    for cores, threads in [(1, 1), (2, 1), (16, 15)]:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert serving_threads() == threads


@pytest.mark.parametrize("flag, value, message", [("kv_cache_gb", 0.0, "--kv-cache-gb 0.0 must be a positive"),
                                                  ("kv_cache_gb", float("nan"), "--kv-cache-gb nan must be"),
                                                  ("prefill_chunk", 0, "--prefill-chunk 0 must be at least 1")])
def test_engine_flags_are_checked_before_the_model_loads(tmp_path, flag, value, message):
    import argparse

    from lmforge.cli import serve

    p = argparse.ArgumentParser()
    serve.add_arguments(p)
    args = p.parse_args(["--model", str(tmp_path)])
    setattr(args, flag, value)
    with pytest.raises(UserError, match=message):
        serve.check_args(args)
