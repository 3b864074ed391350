"""Fine-tuning batches: packing short examples into rows, collation, and a resumable batch iterator.

Either *packing* — several short examples per fixed-length row, positions restarting at 0 for each
example and a block-diagonal attention mask from document ids so no example attends to another — or
*length-grouped* padding. The global order of rows is a function of the seed and epoch only; each rank
takes its slice of every global batch, and ``state_dict()`` / ``load_state_dict()`` resume exactly, also
on a different number of ranks. Examples come from `lmforge.data.sft` (readers and encoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmforge.config import UserError
from lmforge.data.epochs import EpochCursor
from lmforge.data.sft import SFTDataset
from lmforge.models.masks import document_mask_dense
from lmforge.tokenizer.chat_template import IGNORE_INDEX


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Group example indices into rows of at most ``seq_len`` positions (best-fit decreasing).

    Deterministic: ties are broken by index. Within a row examples keep ascending index order.
    """
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row id)
    for i in order:
        n = lengths[i]
        if n > seq_len:
            raise ValueError(f"example {i} has {n} positions > seq_len={seq_len}; encode with the same seq_len")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (room - n, r))
        else:
            rows.append([i])
            bisect.insort(free, (seq_len - n, len(rows) - 1))
    return [sorted(r) for r in rows]


@dataclass
class SFTBatch:
    """One rank's slice of a global batch. ``labels`` are shifted targets (``IGNORE_INDEX`` = no loss).

    Pass ``model(tokens, positions=positions, mask=attention_mask)``; ``attention_mask`` is None for
    right-padded (unpacked) batches, where causality alone keeps real tokens off the padding. The
    Trainer takes it as a dict (`lmforge.tasks.sft.sft_batch_dict`) holding ``doc_ids`` for packed
    rows, not the mask: the loss builds the mask on the device (a FlexAttention block mask on CUDA).
    """

    tokens: Any  # (B, T) long
    labels: Any  # (B, T) long
    positions: Any  # (B, T) long, restarting at 0 for each packed example
    doc_ids: Any  # (B, T) long, -1 on padding
    packed: bool = False  # several examples per row: attention is masked by document

    @property
    def attention_mask(self) -> Any:
        """(B, 1, T, T) bool for packed rows (built on request, on the ids' device), else None."""

        return document_mask_dense(self.doc_ids) if self.packed else None

    @property
    def n_target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def collate_rows(dataset: SFTDataset, rows: Sequence[Sequence[int]], seq_len: int | None, pad_id: int,
                 packed: bool, pad_to_multiple: int = 8) -> SFTBatch:
    """Build a batch from rows of example indices (one example per row unless packed).

    Packed rows are ``seq_len`` long; unpacked rows are padded to the longest row, rounded up to
    ``pad_to_multiple`` (at most ``seq_len``).
    """
    import torch

    fills = [sum(len(dataset.input_ids[i]) - 1 for i in r) for r in rows]
    if packed:
        T = seq_len
    else:
        T = max(fills)
        T = -(-T // pad_to_multiple) * pad_to_multiple
        if seq_len is not None:
            T = min(T, seq_len)
    if max(fills) > T:
        raise ValueError(f"a row holds {max(fills)} positions > seq_len={T}; pack with pack_rows(lengths, seq_len)")
    B = len(rows)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    doc_ids = torch.full((B, T), -1, dtype=torch.long)
    for b, row in enumerate(rows):
        t = 0
        for d, i in enumerate(row):
            ids, lab = dataset.input_ids[i], dataset.labels[i]
            n = len(ids) - 1
            tokens[b, t:t + n] = torch.tensor(ids[:-1])
            labels[b, t:t + n] = torch.tensor(lab[1:])
            positions[b, t:t + n] = torch.arange(n)
            doc_ids[b, t:t + n] = d
            t += n
    return SFTBatch(tokens, labels, positions, doc_ids, packed=bool(packed))


BatchMode = ("pack", "group", "shuffle")


class SFTBatchIterator:
    """Deterministic, resumable batches for fine-tuning.

    ``mode``: ``pack`` (several examples per ``seq_len`` row, block-diagonal attention), ``group``
    (one example per row, rows of similar length batched together to cut padding) or ``shuffle``
    (one example per row, plain random order). Every epoch reorders the units (packed rows or examples)
    with a generator seeded by ``(seed, epoch)``; a global batch is ``global_batch`` consecutive
    units and rank ``r`` of ``world_size`` takes its contiguous slice — as `lmforge.data.ShardLoader` does
    for pretraining — so the global stream does not depend on the world size and a run resumes on more or
    fewer ranks (with the same global batch). The last incomplete global batch of an epoch is dropped.
    """

    def __init__(self, dataset: SFTDataset, global_batch: int, seq_len: int, *, mode: str = "pack",
                 rank: int = 0, world_size: int = 1, seed: int = 0, pad_id: int = 0,
                 group_size: int = 64, pad_to_multiple: int = 8):
        if mode not in BatchMode:
            raise UserError(f"batching mode '{mode}' is not one of {', '.join(BatchMode)}")
        if global_batch <= 0 or world_size <= 0 or not 0 <= rank < world_size:
            raise UserError(f"bad batch layout: global_batch={global_batch}, rank={rank}, "
                            f"world_size={world_size}")
        if global_batch % world_size:
            fix = -(-global_batch // world_size) * world_size
            raise UserError(f"global batch {global_batch} is not divisible by {world_size} ranks; try {fix}")
        too_long = [i for i, n in enumerate(dataset.lengths()) if n > seq_len]
        if too_long:
            raise UserError(f"{len(too_long)} encoded examples are longer than seq_len={seq_len}; "
                            "encode with the same seq_len (encode_examples cuts them)")
        self.dataset, self.seq_len, self.mode = dataset, seq_len, mode
        self.global_batch, self.rank, self.world_size = global_batch, rank, world_size
        self.seed, self.pad_id = seed, pad_id
        self.group_size, self.pad_to_multiple = group_size, pad_to_multiple
        if mode == "pack":
            self.units = pack_rows(dataset.lengths(), seq_len)
        else:
            self.units = [[i] for i in range(len(dataset))]
        if len(self.units) < global_batch:
            what = "packed rows" if mode == "pack" else "examples"
            raise UserError(f"the data fills only {len(self.units)} {what}, fewer than one global batch of "
                            f"{global_batch}; lower the batch size or add data")
        self.cursor = EpochCursor(len(self.units), global_batch, rank=rank, world_size=world_size, seed=seed,
                                  order=self._epoch_order)

    @property
    def batches_per_epoch(self) -> int:
        return self.cursor.batches_per_epoch

    def _epoch_order(self, epoch: int) -> list[int]:
        import numpy as np

        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.units)).tolist()
        if self.mode != "group":
            return order
        # Length grouping: sort within chunks of `group_size` global batches, then shuffle the batches.
        lengths = self.dataset.lengths()
        G = self.global_batch
        chunk = G * self.group_size
        batches: list[list[int]] = []
        for s in range(0, len(order), chunk):
            part = sorted(order[s:s + chunk], key=lambda u: -lengths[self.units[u][0]])
            batches += [part[k:k + G] for k in range(0, len(part), G)]
        full, tail = [b for b in batches if len(b) == G], [b for b in batches if len(b) < G]
        perm = rng.permutation(len(full)).tolist()
        return [u for k in perm for u in full[k]] + [u for b in tail for u in b]

    def __iter__(self) -> SFTBatchIterator:
        return self

    def __next__(self) -> SFTBatch:
        return self.next_batch()

    def next_batch(self) -> SFTBatch:
        """This rank's slice of the next global batch (``global_batch // world_size`` rows)."""
        rows = [self.units[u] for u in self.cursor.next_slice()]
        return collate_rows(self.dataset, rows, self.seq_len, self.pad_id, self.mode == "pack",
                            self.pad_to_multiple)

    def state_dict(self) -> dict[str, Any]:
        return {**self.cursor.state_dict(), "seed": self.seed, "global_batch": self.global_batch,
                "mode": self.mode, "units": len(self.units), "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "global_batch", "mode", "units", "seq_len"):
            mine = getattr(self, key) if key != "units" else len(self.units)
            if state.get(key) != mine:
                raise UserError(f"cannot resume the SFT data stream: checkpoint has {key}={state.get(key)!r}, "
                                f"this run has {mine!r}; resume with the same data, seed and batch settings")
        self.cursor.load_state_dict(state)
