"""Instruction tuning (``finetune.mode: sft``, and ``lora``: the same with LoRA adapters): the loss covers
assistant tokens (and the EOS ending each reply) only. With LoRA only the adapters train, checkpoints hold
only them (and their optimizer state); RUN/model gets the merged weights, RUN/adapter the adapters + a
reference to the base model dir.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmforge.artifacts.adapter_dir import load_adapter, model_fingerprint
from lmforge.data.eval_sample import eval_order
from lmforge.data.sft import encode_examples, load_sft_examples
from lmforge.data.sft_batching import SFTBatchIterator, collate_rows
from lmforge.distributed.world import build_for_world
from lmforge.tasks.finetuning import FinetuneTask, check_ids, pad_id, read_train_dev, set_dropout, split_dev
from lmforge.tokenizer.chat_template import get_chat_template, save_chat_template
from lmforge.train.losses import ShiftedLabelsLoss


def sft_loss(model, batch: dict, *, chunk: int = 1024, z_loss: float = 0.0):
    """Summed next-token cross-entropy on the labelled (assistant) positions; labels are already shifted
    (`lmforge.train.losses.ShiftedLabelsLoss`: chunked, like pretraining's ``train.loss_chunk_tokens``,
    ``train.z_loss``)."""
    return ShiftedLabelsLoss(chunk, z_loss)(model, batch)


def sft_batch_dict(b) -> dict[str, Any]:
    """`SFTBatch` -> the dict the Trainer splits into micro-batches (no mask for unpacked rows)."""
    out = {"tokens": b.tokens, "labels": b.labels, "positions": b.positions,
           "input_tokens": (b.doc_ids >= 0).sum(1)}  # real (non-padding) inputs per row: the throughput count
    if b.packed:  # the ids travel; the loss builds the mask on the device
        out["doc_ids"] = b.doc_ids
    return out


class SFTBatches:
    """`SFTBatchIterator` as a Trainer batch source (dict batches, same resumable state)."""

    def __init__(self, iterator):
        self.iterator = iterator

    def next_batch(self) -> dict[str, Any]:
        return sft_batch_dict(self.iterator.next_batch())

    def state_dict(self) -> dict[str, Any]:
        return self.iterator.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iterator.load_state_dict(state)


class SFTTask(FinetuneTask):
    """``finetune.mode: sft`` (every weight trains) and ``lora`` (adapters only)."""

    name = "sft"
    unit = "tokens"

    def what(self) -> str:
        return "LoRA" if self.uses_lora() else "full fine-tuning"

    def unit_text(self) -> str:
        return "packed rows" if self.cfg.data.batching == "pack" else "examples"

    # ---- data ----
    def read_data(self, world, device) -> None:
        cfg, tokenizer, d = self.cfg, self.tokenizer, self.cfg.data
        template = get_chat_template(tokenizer, d.chat_template)
        train, dev = read_train_dev(lambda paths, cap: load_sft_examples(paths, d.format, d.columns, cap), d,
                                    cfg.train.seed)
        train_ds = encode_examples(tokenizer, train, d.seq_len, template)
        check_ids(train_ds.input_ids, self.mcfg.vocab_size, "data.train")
        pad = pad_id(tokenizer)
        iterator = SFTBatchIterator(train_ds, cfg.global_batch_size, d.seq_len, mode=d.batching,
                                    rank=world.dp_rank, world_size=world.dp_size, seed=cfg.train.seed, pad_id=pad)
        self.batches = SFTBatches(iterator)
        self.units_per_epoch, self.n_train, self.n_dev = len(iterator.units), len(train_ds), len(dev)
        self.stats, self.template = {"train": train_ds.stats}, template
        if dev and cfg.eval.batches:
            dev_ds = encode_examples(tokenizer, dev, d.seq_len, template)
            check_ids(dev_ds.input_ids, self.mcfg.vocab_size, "data.dev")
            self.stats["dev"] = dev_ds.stats
            bs = cfg.eval.batch_size or cfg.train.micro_batch
            # a capped dev set is a seeded sample (not the longest examples), the same at every evaluation
            order = eval_order([len(x) for x in dev_ds.input_ids], cfg.eval.batches * bs, cfg.train.seed)
            rows = [[i] for i in order]
            fixed = [sft_batch_dict(collate_rows(dev_ds, rows[s:s + bs], d.seq_len, pad, packed=False))
                     for s in range(0, len(rows), bs)]

            def val_batches():  # the whole set on every rank; the Trainer shares it out evenly
                return fixed

            self._val = val_batches

    def task_fields(self) -> dict[str, Any]:
        return self.chat_fields()

    # ---- model and loss ----
    def load_base(self, world, device):
        """Full fine-tuning in a job that shards parameters (FSDP2/TP) builds on the meta device and each
        rank reads only its slices of the weights when the Trainer parallelizes the model; LoRA wraps the
        full model first."""
        if world is not None and not self.uses_lora():
            model = build_for_world(self.mcfg, world, device, model_dir=self.cfg.model.path)
            if self.cfg.model.dropout is not None:
                set_dropout(model, self.cfg.model.dropout)
            return model
        return super().load_base(world, device)

    def loss(self, model):
        return ShiftedLabelsLoss.from_config(self.cfg.train)  # train.loss_chunk_tokens, train.z_loss

    def flops_per_token(self) -> float | None:
        return self.mcfg.flops_per_token(self.cfg.data.seq_len)

    # ---- the end ----
    def save_dir(self, model, out: Path, weights_step: int) -> None:
        self.save_lm_dir(model, out, weights_step)
        if self.template is not None and self.cfg.data.chat_template is not None:
            save_chat_template(self.template, out)  # the template it was trained with travels with the model


__all__ = ["SFTBatches", "SFTTask", "load_adapter", "model_fingerprint", "sft_batch_dict", "sft_loss", "split_dev"]
