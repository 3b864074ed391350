"""A paged KV cache for serving: fixed-size blocks of token positions from one pool, a block table per
sequence, and prefix caching by block hash.

Storage is (layers, n_blocks * block_size, kv_heads, head_dim): token ``t`` of a sequence lives in row
``table[t // block_size] * block_size + t % block_size``. A sequence takes blocks as it grows and gives them
back when it ends, so memory follows the tokens held, not ``max_batch x max_context``; a forward reads only
the rows its sequences hold (gathered per step), so a decode step pays for the longest live sequence, not
for the allocated context.

Prefix caching: a *full* block's identity is a hash chained over every token up to its end (the block's own
tokens and its parent's hash), so two requests that start with the same tokens (a system prompt, few-shot
examples, the history of a conversation) map their common full blocks to the same hashes and share those
blocks. A block is reference-counted; at zero references a hashed block is not freed but kept, evictable,
in least-recently-used order, and taken back for new tokens only when no never-used block is left. Only
full blocks are shared and a full block is never written again, so sharing cannot change what a sequence
reads.

The model talks to a view (`prefill` for one sequence's chunk of tokens, `decode` for one new token in
each of several sequences) with the `KVCache` interface: ``update(layer, k, v)`` writes the new keys and
values and returns every key and value the queries may see; ``advance(t)``; ``length``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from lmforge.models.config import ModelConfig


class PoolExhausted(RuntimeError):
    """No free or evictable block is left (the caller preempts a sequence and retries)."""


def block_hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The identity of a full block: a digest of its parent's identity and its own token ids."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b",".join(str(int(t)).encode() for t in tokens))
    return h.digest()


class PagedKVCache:
    def __init__(self, cfg: ModelConfig, n_blocks: int, block_size: int = 16,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if n_blocks < 1 or block_size < 1:
            raise ValueError(f"a paged KV cache needs at least one block of at least one token "
                             f"(n_blocks={n_blocks}, block_size={block_size})")
        shape = (cfg.n_layers, n_blocks * block_size, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.n_blocks, self.block_size, self.window = n_blocks, block_size, cfg.sliding_window
        self.refs = [0] * n_blocks
        self._free = list(range(n_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self._hash_of: dict[int, bytes] = {}  # block -> its hash (full, registered blocks only)
        self._by_hash: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()  # hashed blocks at 0 refs, oldest first
        self.hits = 0  # blocks reused from the prefix cache

    # ---- blocks ------------------------------------------------------------------------------------
    @property
    def available(self) -> int:
        """Blocks a sequence can take now: never-used ones plus cached ones nobody holds."""
        return len(self._free) + len(self._evictable)

    def allocate(self) -> int:
        if self._free:
            b = self._free.pop()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)  # the least recently used cached block
            del self._by_hash[self._hash_of.pop(b)]
        else:
            raise PoolExhausted(f"all {self.n_blocks} KV-cache blocks are in use")
        self.refs[b] = 1
        return b

    def release(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self._hash_of:
                    self._evictable[b] = None  # kept for a later request with the same prefix
                else:
                    self._free.append(b)

    def lookup(self, h: bytes) -> int | None:
        """The cached block with hash ``h``, now held once more by the caller; None when not cached."""
        b = self._by_hash.get(h)
        if b is None:
            return None
        if self.refs[b] == 0:
            del self._evictable[b]
        self.refs[b] += 1
        self.hits += 1
        return b

    def register(self, block: int, h: bytes) -> None:
        """``block`` is full and holds the tokens hashed to ``h``: later requests may share it."""
        if h not in self._by_hash and block not in self._hash_of:
            self._by_hash[h], self._hash_of[block] = block, h

    # ---- views for the model --------------------------------------------------------------------------
    def rows(self, table: Sequence[int], start: int, end: int) -> torch.Tensor:
        """Cache rows of a sequence's tokens [start, end)."""
        bs = self.block_size
        return torch.tensor([table[t // bs] * bs + t % bs for t in range(start, end)], device=self.k.device)

    def prefill(self, table: Sequence[int], start: int, n: int) -> _PrefillView:
        """A view for tokens [start, start + n) of one sequence whose tokens [0, start) are cached; the
        model's own causal mask (offset ``start``) applies."""
        return _PrefillView(self, table, start, n)

    def prefill_fresh(self, tables: Sequence[Sequence[int]], counts: Sequence[int]) -> _FreshPrefillView:
        """A view for the first ``counts[b]`` tokens of ``len(tables)`` sequences with nothing cached yet, run
        as one batch right-padded to the longest: the model's causal mask keeps each row's tokens from
        the padding after them, and only the real tokens' keys and values are written."""
        return _FreshPrefillView(self, tables, counts)

    def decode(self, tables: Sequence[Sequence[int]], lengths: Sequence[int]) -> _DecodeView:
        """A view for one new token in each of ``len(tables)`` sequences, row ``b`` holding
        ``lengths[b]`` cached tokens; pass ``view.pos[:, None]`` as positions and ``view.key_mask``
        (B, 1, 1, S) as the mask.

        Keys are gathered up to the longest row (S = 1 + its cached tokens) and shorter rows are masked
        past their own token. With a sliding window narrower than S the rows are gathered *right-aligned*
        instead, so that the new token sits at key index S-1 in every row and the window is measured from
        the right place.
        """
        return _DecodeView(self, tables, lengths)


class _PrefillView:
    def __init__(self, cache: PagedKVCache, table: Sequence[int], start: int, n: int):
        self.cache, self.length = cache, start
        self._write = cache.rows(table, start, start + n)
        self._read = cache.rows(table, 0, start + n) if start else None

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]  # (rows, KV, d)
        ck.index_copy_(0, self._write, k[0].transpose(0, 1))  # k: (1, KV, T, d)
        cv.index_copy_(0, self._write, v[0].transpose(0, 1))
        if self._read is None:  # nothing cached before this chunk: the keys are the chunk's own
            return k, v
        return (ck.index_select(0, self._read).transpose(0, 1)[None],
                cv.index_select(0, self._read).transpose(0, 1)[None])

    def advance(self, t: int) -> None:
        self.length += t


class _FreshPrefillView:
    def __init__(self, cache: PagedKVCache, tables: Sequence[Sequence[int]], counts: Sequence[int]):
        dev = cache.k.device
        self.cache, self.length = cache, 0
        self._write = torch.cat([cache.rows(t, 0, n) for t, n in zip(tables, counts)])
        width = max(counts)
        self._real = torch.arange(width, device=dev)[None, :] < torch.tensor(list(counts), device=dev)[:, None]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]  # (rows, KV, d)
        ck.index_copy_(0, self._write, k.transpose(1, 2)[self._real])  # k: (B, KV, T, d) -> (real tokens, KV, d)
        cv.index_copy_(0, self._write, v.transpose(1, 2)[self._real])
        return k, v  # nothing cached before: the keys are the batch's own

    def advance(self, t: int) -> None:
        self.length += t


class _DecodeView:
    def __init__(self, cache: PagedKVCache, tables: Sequence[Sequence[int]], lengths: Sequence[int]):
        dev, bs = cache.k.device, cache.block_size
        width = max(lengths) + 1  # S
        n_blocks = (width + bs - 1) // bs
        table = torch.tensor([list(t[:n_blocks]) + [0] * (n_blocks - len(t[:n_blocks])) for t in tables],
                             device=dev)  # (B, blocks)
        self.cache, self.length = cache, width - 1
        self.pos = torch.tensor(list(lengths), device=dev)  # (B,): each row's new token's position
        j = torch.arange(width, device=dev)
        if cache.window is not None and width > cache.window:  # right-aligned: key j is token pos - (S-1) + j
            src = self.pos[:, None] - (width - 1) + j[None, :]
            self.key_mask = (src >= 0)[:, None, None, :]
            src = src.clamp(min=0)
        else:
            src = j[None, :].expand(len(lengths), width)
            self.key_mask = (j[None, :] <= self.pos[:, None])[:, None, None, :]  # (B, 1, 1, S)
        block = table.gather(1, torch.div(src, bs, rounding_mode="floor"))
        self._read = (block * bs + src % bs).reshape(-1)  # (B * S,) cache rows; masked keys read row 0..
        last = table.gather(1, torch.div(self.pos, bs, rounding_mode="floor")[:, None])[:, 0]
        self._write = last * bs + self.pos % bs  # (B,)
        self._shape = (len(lengths), width)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ck, cv = self.cache.k[layer_idx], self.cache.v[layer_idx]
        ck.index_copy_(0, self._write, k[:, :, 0])  # k: (B, KV, 1, d)
        cv.index_copy_(0, self._write, v[:, :, 0])
        b, s = self._shape
        return (ck.index_select(0, self._read).view(b, s, *ck.shape[1:]).transpose(1, 2),
                cv.index_select(0, self._read).view(b, s, *cv.shape[1:]).transpose(1, 2))

    def advance(self, t: int) -> None:
        self.length += t
