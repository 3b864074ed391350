"""ShardLoader: window sampling, the seed-only global order, resume across world sizes, checks."""

import hashlib
import json

import numpy as np
import pytest
import torch

from lmforge.config import UserError
from lmforge.data.loader import (
    FeistelPermutation,
    ShardLoader,
    document_ids,
    document_mask,
    document_positions,
)
from lmforge.data.shards import FORMAT


def write_shards(d, splits, vocab=1000, dtype="uint16", eos=0, tok_hash="sha256:test"):
    """A token-shard dir holding the given arrays (one list of shard arrays per split)."""
    d.mkdir(parents=True, exist_ok=True)
    index = {"format": FORMAT, "version": 1, "tokenizer_hash": tok_hash, "vocab_size": vocab, "dtype": dtype,
             "eos_id": eos, "splits": {}}
    for split, arrays in splits.items():
        shards = []
        for i, arr in enumerate(arrays):
            name = f"{split}_{i:05d}.bin"
            blob = np.asarray(arr, dtype=dtype).tobytes()
            (d / name).write_bytes(blob)
            shards.append({"file": name, "tokens": len(arr), "documents": 1,
                           "sha256": hashlib.sha256(blob).hexdigest()})
        index["splits"][split] = {"tokens": sum(len(a) for a in arrays), "documents": len(arrays),
                                  "shards": shards}
    (d / "index.json").write_text(json.dumps(index))
    return d


@pytest.fixture
def seq_dir(tmp_path):
    # token value = 1 + position in the stream, spread over 3 shards of uneven size
    stream = np.arange(1, 2001)
    return write_shards(tmp_path / "s", {"train": [stream[:700], stream[700:1500], stream[1500:]],
                                         "val": [np.arange(3000, 3300)]}, vocab=5000), stream


def test_windows_are_stream_slices_across_shards(seq_dir):
    d, stream = seq_dir
    loader = ShardLoader(d, seq_len=16, global_batch=4, seed=3)
    assert loader.num_tokens == 2000 and loader.num_windows == (2000 - 1) // 16
    seen = []
    for _ in range(loader.num_windows // 4):
        batch = loader.next_batch()
        assert batch.shape == (4, 17) and batch.dtype == torch.long
        for row in batch.numpy():
            w = int(row[0]) - 1
            assert w % 16 == 0 and np.array_equal(stream[w:w + 17], row)
            seen.append(w // 16)
    # one epoch visits every window once
    assert sorted(seen) == list(range(len(seen))) and len(seen) == (loader.num_windows // 4) * 4


def test_permutation_is_a_bijection_keyed_by_seed_and_epoch():
    for n in (1, 2, 7, 1000, 4099):
        p = FeistelPermutation(n, seed=5, epoch=0)(np.arange(n, dtype=np.uint64))
        assert sorted(p.tolist()) == list(range(n))
    a = FeistelPermutation(1000, 5, 0)(np.arange(1000, dtype=np.uint64))
    b = FeistelPermutation(1000, 5, 1)(np.arange(1000, dtype=np.uint64))
    c = FeistelPermutation(1000, 6, 0)(np.arange(1000, dtype=np.uint64))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert np.array_equal(a, FeistelPermutation(1000, 5, 0)(np.arange(1000, dtype=np.uint64)))


def _global_stream(d, n_samples, **kw):
    loader = ShardLoader(d, world_size=1, rank=0, global_batch=1, **kw)
    return [tuple(loader.next_batch()[0].tolist()) for _ in range(n_samples)]


def test_resume_on_1_2_4_ranks_continues_the_same_global_stream(seq_dir):
    d, _ = seq_dir
    kw = dict(seq_len=8, seed=11)
    gb = 8
    n_windows = ShardLoader(d, **kw).num_windows
    steps = (n_windows // gb) + 5  # runs past an epoch boundary
    reference = _global_stream(d, steps * gb, **kw)

    got = []
    # 3 steps on 2 ranks, then 4 ranks, then 1 rank: every sample once, in the reference order
    plan = [(2, 3), (4, steps // 2), (1, steps - 3 - steps // 2)]
    state = None
    for world, n_steps in plan:
        loaders = [ShardLoader(d, global_batch=gb, rank=r, world_size=world, **kw) for r in range(world)]
        if state is not None:
            for ld in loaders:
                ld.load_state_dict(state)
        for _ in range(n_steps):
            parts = [ld.next_batch() for ld in loaders]
            got.extend(tuple(row.tolist()) for part in parts for row in part)
        state = loaders[0].state_dict()
        assert all(ld.state_dict() == state for ld in loaders)
    assert got == reference
    assert loaders[0].epoch == 1 and loaders[0].samples_seen == steps * gb


def test_epoch_attribute_and_reshuffle(seq_dir):
    d, _ = seq_dir
    loader = ShardLoader(d, seq_len=100, global_batch=1, seed=0)
    n = loader.num_windows
    first = [tuple(loader.next_batch()[0].tolist()) for _ in range(n)]
    assert loader.epoch == 1
    second = [tuple(loader.next_batch()[0].tolist()) for _ in range(n)]
    assert sorted(first) == sorted(second) and first != second


def test_state_dict_rejects_other_settings(seq_dir):
    d, _ = seq_dir
    a = ShardLoader(d, seq_len=8, global_batch=4, seed=1)
    a.next_batch()
    b = ShardLoader(d, seq_len=16, global_batch=4, seed=1)
    with pytest.raises(UserError, match="seq_len"):
        b.load_state_dict(a.state_dict())
    c = ShardLoader(d, seq_len=8, global_batch=4, seed=2)
    with pytest.raises(UserError, match="seed"):
        c.load_state_dict(a.state_dict())


def test_eval_batches_are_deterministic_and_from_val(seq_dir):
    d, _ = seq_dir
    train = ShardLoader(d, seq_len=8, global_batch=4, seed=1)
    e1 = [b.clone() for b in train.eval_batches(3, 2)]
    train.next_batch()
    e2 = list(train.eval_batches(3, 2))
    assert len(e1) == 3 and all(b.shape == (2, 9) for b in e1)
    assert all(torch.equal(a, b) for a, b in zip(e1, e2))
    val_tokens = set(range(3000, 3300))
    assert all(set(b.flatten().tolist()) <= val_tokens for b in e1)
    val = ShardLoader(d, split="val", seq_len=8, global_batch=2)
    assert all(torch.equal(a, b) for a, b in zip(e1, val.eval_batches(3, 2)))


def test_errors_are_one_line_and_name_the_shard(tmp_path):
    good = np.arange(500) % 50
    d = write_shards(tmp_path / "a", {"train": [good, good]}, vocab=1000)
    with pytest.raises(UserError, match="not divisible"):
        ShardLoader(d, seq_len=8, global_batch=6, world_size=4)
    with pytest.raises(UserError, match="no 'val' split"):
        ShardLoader(d, split="val", seq_len=8)
    with pytest.raises(UserError, match="tokenizer"):
        ShardLoader(d, seq_len=8, tokenizer_hash="sha256:other")
    with pytest.raises(UserError, match="1,000-token vocabulary"):
        ShardLoader(d, seq_len=8, check_vocab=512)
    with pytest.raises(UserError, match="fewer than seq_len"):
        ShardLoader(d, seq_len=5000)
    with pytest.raises(UserError, match="index.json is missing"):
        ShardLoader(tmp_path, seq_len=8)
    # a token id beyond the model's vocab (index says 40, the data holds 45)
    bad = write_shards(tmp_path / "b", {"train": [np.arange(100) % 46]}, vocab=40)
    with pytest.raises(UserError, match=r"train_00000\.bin holds token id 4[0-5] >= the model's vocab size 40"):
        loader = ShardLoader(bad, seq_len=99, global_batch=1, check_vocab=40)
        loader.next_batch()
    # truncated shard
    shard = d / "train_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(UserError, match=r"train_00001\.bin is truncated") as e:
        ShardLoader(d, seq_len=8)
    assert "\n" not in str(e.value)
    # corrupt (same size, other bytes): found by verify=True
    d2 = write_shards(tmp_path / "c", {"train": [good]})
    blob = bytearray((d2 / "train_00000.bin").read_bytes())
    blob[10] ^= 0xFF
    (d2 / "train_00000.bin").write_bytes(bytes(blob))
    ShardLoader(d2, seq_len=8)  # size checks pass
    with pytest.raises(UserError, match=r"train_00000\.bin is corrupt"):
        ShardLoader(d2, seq_len=8, verify=True)
    (d2 / "index.json").write_text("{not json")
    with pytest.raises(UserError, match=r"index\.json.* is not valid JSON.*re-run `lmforge prepare`"):
        ShardLoader(d2, seq_len=8)


def test_uint32_shards(tmp_path):
    arr = np.arange(70_000, 70_000 + 300)
    d = write_shards(tmp_path / "u", {"train": [arr]}, vocab=100_000, dtype="uint32")
    batch = ShardLoader(d, seq_len=10, global_batch=2, check_vocab=100_000).next_batch()
    assert batch.min() >= 70_000 and batch.max() < 70_300


def test_doc_mask_ids_mask_and_positions(tmp_path):
    # documents [5 6 7 EOS] [8 9 EOS] [4 4 4 4 4 4 EOS] ...
    eos = 0
    stream = np.array([5, 6, 7, eos, 8, 9, eos, 4, 4, 4, 4, 4, 4, eos] * 10)
    d = write_shards(tmp_path / "m", {"train": [stream]}, eos=eos)
    loader = ShardLoader(d, seq_len=13, global_batch=1, doc_mask=True, seed=0)
    tokens, doc_ids = loader.next_batch()
    assert tokens.shape == doc_ids.shape == (1, 14)
    ids = document_ids(torch.tensor([[5, 6, eos, 8, eos, 9]]), eos)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 2]]
    pos = document_positions(ids)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0]]
    mask = document_mask(ids)
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.bool
    assert mask[0, 0, 1, 0] and not mask[0, 0, 3, 2] and mask[0, 0, 4, 3] and not mask[0, 0, 5, 4]
    # default off: a plain tensor
    assert isinstance(ShardLoader(d, seq_len=13, global_batch=1).next_batch(), torch.Tensor)
