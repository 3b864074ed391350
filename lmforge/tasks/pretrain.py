"""Pretraining a causal LM (``train.objective: clm``) on token shards: shard loader + model -> RUN/model.

Every check that can fail on the user's input runs before the model is built or a batch is read.
The masked-LM variant (``train.objective: mlm``) is `lmforge.tasks.mlm`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lmforge.artifacts.model_dir import save_model_dir
from lmforge.config import ConfigError, UserError, to_dict
from lmforge.console import info
from lmforge.data.loader import ShardLoader, document_positions
from lmforge.data.mixture import MixPhaseSpec, MixSchedule, MixtureLoader, Source, read_source_indexes
from lmforge.data.shards import read_index
from lmforge.distributed.world import build_for_world
from lmforge.models.embedding_init import coverage_line, init_embeddings_from
from lmforge.models.transformer import build_model
from lmforge.tasks.base import RunResult, Task, final_loss, stopped_at
from lmforge.tokenizer.core import load_tokenizer
from lmforge.train.config import PretrainConfig, grad_accum_steps
from lmforge.train.losses import CausalLMLoss
from lmforge.train.rank_output import note  # notes every rank would repeat: rank 0 only
from lmforge.train.trainer import Job

# Config fields whose change alters the math a checkpoint encodes; a resume refuses to mix them.
MATH_DATA_FIELDS = ("seq_len", "doc_mask")


class PretrainBatches:
    """The trainer's batch source over a ShardLoader.

    With ``doc_mask`` the loader yields (tokens, doc_ids), turned here into the causal-LM batch dict
    with the document ids (the attention mask is built from them on the device) and positions that restart in every packed document. On resume, a loader
    state from other data settings (seq_len, tokenizer, data dir) is refused unless the user allowed
    that change (``checkpoint.allow_mismatch`` naming a ``data.*`` field): the stream then continues
    after the same number of tokens, in the new data's order.
    """

    def __init__(self, loader, doc_mask: bool = False, allow_data_change: bool = False):
        self.loader = loader
        self.doc_mask = doc_mask
        self.allow_data_change = allow_data_change

    @staticmethod
    def convert(item) -> dict[str, Any]:
        tokens, doc_ids = item
        ids = doc_ids[:, :-1]  # inputs are tokens[:, :-1]
        # the ids, not a (B, 1, T, T) mask: the loss builds the mask on the device (`next_token_loss`)
        return {"tokens": tokens, "doc_ids": ids, "positions": document_positions(ids)}

    def next_batch(self):
        item = self.loader.next_batch()
        return self.convert(item) if self.doc_mask else item

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        try:
            for line in self.loader.load_state_dict(state) or []:  # a mixture's notes (a source added)
                note(f"note: {line}")
            return
        except UserError as e:
            if not self.allow_data_change:
                raise UserError(f"{e}; or continue on the new data with checkpoint.allow_mismatch=[data.dir]") from None
        tokens_seen = int(state["samples_seen"]) * int(state.get("seq_len") or self.loader.seq_len)
        self.loader.samples_seen = tokens_seen // self.loader.seq_len
        if isinstance(self.loader, MixtureLoader):  # every source from its first window; the schedule's step kept
            self.loader.cursors = [0] * len(self.loader.cursors)
            steps = self.loader.samples_seen // self.loader.global_batch
            self.loader.batches_seen = int(state.get("batches_seen", steps))
        note(f"note: data changed since the checkpoint; continuing after {tokens_seen:,} tokens "
             f"({self.loader.samples_seen:,} samples of the new data)")


def mixture_sources(cfg: PretrainConfig) -> list[Source]:
    return [Source(s.name, s.dir, s.weight, s.on_exhaust) for s in cfg.data.sources]


def mixture_schedule(cfg: PretrainConfig) -> MixSchedule:
    """data.sources' weights, then data.schedule's phases."""
    return MixSchedule([s.name for s in cfg.data.sources], [s.weight for s in cfg.data.sources],
                       [MixPhaseSpec(p.until_step, dict(p.weights), p.interpolate) for p in cfg.data.schedule])


def resolve_model_config(cfg: PretrainConfig, data_vocab: int):
    """The model config; its vocabulary follows the data's tokenizer unless model.vocab_size is set."""
    model_section = dict(cfg.model)
    mcfg = cfg.model_config()
    if model_section.get("from"):  # continued pretraining keeps the model dir's vocabulary
        if mcfg.vocab_size < data_vocab:
            raise ConfigError(f"model.from='{model_section['from']}' has a {mcfg.vocab_size:,}-token vocabulary, "
                              f"smaller than the data's tokenizer ({data_vocab:,}); prepare the data with the "
                              "model's tokenizer")
    elif "vocab_size" in model_section:
        if mcfg.vocab_size < data_vocab:
            raise ConfigError(f"model.vocab_size={mcfg.vocab_size} is smaller than the data's tokenizer "
                              f"vocabulary ({data_vocab:,}); set model.vocab_size>={data_vocab} or drop it")
    elif mcfg.vocab_size != data_vocab:
        model_section["vocab_size"] = data_vocab
        cfg.model = model_section
        mcfg = cfg.model_config()
    if cfg.data.seq_len > mcfg.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}; "
                          f"lower data.seq_len or set model.max_seq_len={cfg.data.seq_len}")
    return mcfg


def math_fields(mcfg, cfg: PretrainConfig, index: dict[str, Any]) -> dict[str, Any]:
    fields = {f"model.{k}": v for k, v in to_dict(mcfg).items()}
    fields.update({f"data.{k}": getattr(cfg.data, k) for k in MATH_DATA_FIELDS})
    fields["data.tokenizer_hash"] = index.get("tokenizer_hash")
    return fields


def resolve_tokenizer_dir(cfg: PretrainConfig, index: dict[str, Any]) -> str | None:
    path = cfg.data.tokenizer or (index.get("tokenizer") or {}).get("path")
    if path is None:
        return None
    if not Path(path).is_dir():
        if cfg.data.tokenizer:
            raise ConfigError(f"data.tokenizer='{path}' does not exist; point it at the tokenizer dir the shards "
                              "were prepared with")
        note(f"note: the tokenizer dir recorded in {cfg.data.shard_dirs()[0]}/index.json ({path}) is gone; "
             "RUN/model will have no tokenizer files (set data.tokenizer to copy them)")
        return None
    return str(path)


def bytes_per_token(batches, tokenizer_dir: str | None, expected_hash: str | None) -> float | None:
    """UTF-8 bytes per target token of the validation batches (decoded with the tokenizer): turns val
    loss into bits per byte, which compares across tokenizers."""
    if tokenizer_dir is None:
        return None
    tok = load_tokenizer(tokenizer_dir)
    if expected_hash and tok.hash != expected_hash:
        raise ConfigError(f"tokenizer '{tokenizer_dir}' (hash {tok.hash}) is not the one the shards were prepared "
                          f"with ({expected_hash}); set data.tokenizer to the right dir")
    n_bytes = n_tokens = 0
    for batch in batches:
        tokens = batch["tokens"] if isinstance(batch, dict) else batch
        for row in tokens[:, 1:].tolist():
            n_bytes += len(tok.decode(row).encode("utf-8"))
            n_tokens += len(row)
    return n_bytes / n_tokens if n_tokens and n_bytes else None


class PretrainTask(Task):
    """Causal-LM pretraining (``train.objective: clm``), from scratch or continued from ``model.from``."""

    name = "clm"
    unit = "tokens"

    def __init__(self, cfg: PretrainConfig):
        super().__init__(cfg)
        self.index: dict[str, Any] = {}
        self.mcfg = None
        self.val_groups: list[str] | None = None  # a mixture's source of each evaluation batch
        self.group_bytes: dict[str, float] = {}  # a mixture's bytes per token of each source's val split

    # ---- before any work ----
    def check(self) -> None:
        if self.cfg.data.sources:  # a mixture: every source's index, one tokenizer (checked by hash)
            self.indexes = read_source_indexes(mixture_sources(self.cfg))
            self.index = next(iter(self.indexes.values()))
            self.data_vocab = max(int(ix.get("vocab_size") or 0) for ix in self.indexes.values())
        else:
            self.indexes = {}
            self.index = read_index(self.cfg.data.dir)
            self.data_vocab = int(self.index.get("vocab_size") or 0)
        self.mcfg = resolve_model_config(self.cfg, self.data_vocab)

    # ---- data ----
    def prepare(self, world, device) -> None:
        cfg, index = self.cfg, self.index
        self.tokenizer_dir = resolve_tokenizer_dir(cfg, index)
        cfg.data.tokenizer = self.tokenizer_dir
        if cfg.data.sources:
            self.prepare_mixture(world)
            return
        loader = ShardLoader(cfg.data.dir, "train", cfg.data.seq_len, cfg.global_batch_size, rank=world.dp_rank,
                             world_size=world.dp_size, seed=cfg.train.seed, check_vocab=self.mcfg.vocab_size,
                             tokenizer_hash=index.get("tokenizer_hash"), doc_mask=cfg.data.doc_mask,
                             cache_dir=cfg.data.cache_dir)
        self.loader = loader
        self.batches = PretrainBatches(loader, cfg.data.doc_mask,
                                       any(k.startswith("data.") for k in cfg.checkpoint.allow_mismatch))
        self._val = None
        self.val_groups = None
        has_val = bool(index["splits"].get("val", {}).get("tokens"))
        if cfg.eval.batches and has_val:
            eval_bs = cfg.eval.batch_size or cfg.train.micro_batch

            def val_batches():  # the whole set on every rank; the Trainer shares it out evenly
                batches = loader.eval_batches(cfg.eval.batches, eval_bs)
                return map(PretrainBatches.convert, batches) if cfg.data.doc_mask else batches

            self._val = val_batches
        elif cfg.eval.batches:
            note(f"note: {cfg.data.dir} has no val split; no validation loss (prepare with --val-fraction 0.01)")
        self.bytes_per_token = None
        if self._val is not None:
            self.bytes_per_token = bytes_per_token(
                loader.eval_batches(cfg.eval.batches, cfg.eval.batch_size or cfg.train.micro_batch),
                self.tokenizer_dir, index.get("tokenizer_hash"))

    def prepare_mixture(self, world) -> None:
        """data.sources: a MixtureLoader; the evaluation covers every source with a val split (eval.batches
        each) and reports each one's loss and bits/byte beside their weighted total."""
        cfg = self.cfg
        self.loader = loader = MixtureLoader(
            mixture_sources(cfg), mixture_schedule(cfg), "train", cfg.data.seq_len, cfg.global_batch_size,
            rank=world.dp_rank, world_size=world.dp_size, seed=cfg.train.seed, check_vocab=self.mcfg.vocab_size,
            tokenizer_hash=self.index.get("tokenizer_hash"), doc_mask=cfg.data.doc_mask,
            cache_dir=cfg.data.cache_dir)
        self.batches = PretrainBatches(loader, cfg.data.doc_mask,
                                       any(k.startswith("data.") for k in cfg.checkpoint.allow_mismatch))
        self._val, self.val_groups, self.bytes_per_token = None, None, None
        with_val = [n for n in loader.names if loader.has_split(n)]
        missing = [n for n in loader.names if n not in with_val]
        if cfg.eval.batches and missing:
            note(f"note: data.sources {', '.join(missing)} ha{'s' if len(missing) == 1 else 've'} no val split; "
                 "not in the evaluation (prepare with --val-fraction 0.01)")
        if not cfg.eval.batches or not with_val:
            return
        eval_bs = cfg.eval.batch_size or cfg.train.micro_batch

        def val_batches():  # every source's batches in turn, the same on every rank
            batches = loader.eval_batches(cfg.eval.batches, eval_bs)
            return map(PretrainBatches.convert, batches) if cfg.data.doc_mask else batches

        self._val = val_batches
        self.val_groups = [n for n in with_val for _ in range(cfg.eval.batches)]
        for n in with_val:
            bpt = bytes_per_token(loader.eval_batches(cfg.eval.batches, eval_bs, source=n), self.tokenizer_dir,
                                  self.index.get("tokenizer_hash"))
            if bpt:
                self.group_bytes[n] = bpt

    def total_steps(self) -> int:
        return self.cfg.steps_for()

    def math_fields(self) -> dict[str, Any]:
        return math_fields(self.mcfg, self.cfg, self.index)

    # ---- model and loss ----
    def build_model(self, world, device, resume_from):
        cfg, mcfg = self.cfg, self.mcfg
        self.extra = {"trained_with": "lmforge pretrain", "tokenizer_hash": self.index.get("tokenizer_hash")}
        vectors = cfg.model.get("init_embeddings_from")
        base_dir = cfg.model.get("from") if resume_from is None else None  # a resume reads the checkpoint instead
        if base_dir and (vectors or self.whole_model_first()):
            raise ConfigError("model.from continues a causal LM's pretraining; drop model.init_embeddings_from and "
                              "train.objective=mlm (they start a new model)")
        if (vectors and resume_from is None) or self.whole_model_first():  # these edit the whole model
            model = build_model(mcfg, device=device, dtype=torch.float32, seed=cfg.train.seed,
                                init=resume_from is None)
        else:  # on the meta device when the job shards parameters; each rank fills only its shards
            model = build_for_world(mcfg, world, device, seed=cfg.train.seed, init=resume_from is None,
                                    model_dir=base_dir)
        if base_dir:
            self.extra["continued_from"] = str(Path(base_dir).resolve())
        if vectors and resume_from is None:  # word2vec / GloVe / fastText rows for the tokens that spell words
            if self.tokenizer_dir is None:
                raise ConfigError("model.init_embeddings_from needs the data's tokenizer; set data.tokenizer")
            report = init_embeddings_from(model, load_tokenizer(self.tokenizer_dir), vectors, seed=cfg.train.seed)
            self.extra["init_embeddings_from"] = report
            if world.is_main:
                info(coverage_line(report))
        return model

    def whole_model_first(self) -> bool:
        """True when the task edits the whole model once it exists (so it is never built sharded)."""
        return False

    def loss(self, model):
        return CausalLMLoss.from_config(self.cfg.train)  # train.loss_chunk_tokens, train.z_loss

    def flops_per_token(self) -> float | None:
        return self.mcfg.flops_per_token(self.cfg.data.seq_len)

    def save_model(self, model, out) -> None:
        save_model_dir(model, out, tokenizer_dir=self.tokenizer_dir, extra=self.extra)

    def config_dict(self) -> dict[str, Any]:
        cfg, mcfg = self.cfg, self.mcfg
        resolved = to_dict(cfg)
        resolved["model"] = {"preset": cfg.model.get("preset"), **to_dict(mcfg)} if cfg.model.get("preset") \
            else to_dict(mcfg)
        if cfg.model.get("init_embeddings_from"):
            resolved["model"]["init_embeddings_from"] = cfg.model["init_embeddings_from"]
        return resolved

    def describe(self, model, world, device, total_steps, resume_from) -> None:
        cfg, mcfg = self.cfg, self.mcfg
        if world.is_main:
            accum = grad_accum_steps(cfg.global_batch_size, cfg.train.micro_batch, world.dp_size)
            info(f"pretrain: {mcfg.num_params() / 1e6:,.1f}M params, {total_steps:,} steps x "
                 f"{cfg.global_batch_size} seqs x {cfg.data.seq_len} tokens (micro {cfg.train.micro_batch} x "
                 f"{accum} accumulation x {world.dp_size} ranks) on {device}; run dir {self.run_dir}")

    def job(self, model, world, device, total_steps) -> Job:
        return Job(model, self.batches, total_steps, self.loss(model), self.val_batches(),
                   math_fields=self.math_fields(), flops_per_token=self.flops_per_token(),
                   bytes_per_token=self.bytes_per_token, save_model=self.save_model, config_dict=self.config_dict(),
                   finish_tracking=False, val_groups=self.val_groups,
                   val_group_weights={s.name: s.weight for s in self.cfg.data.sources} if self.val_groups else None,
                   val_group_bytes_per_token=self.group_bytes or None)

    # ---- the end ----
    @classmethod
    def summary(cls, res: RunResult) -> tuple[str, dict[str, Any]]:
        """The one-line CLI summary and the --json payload (the Trainer's result)."""
        result = res.train
        val = result.val or {}
        parts = [stopped_at(result, f"{result.tokens:,} tokens"), *final_loss(result)]
        if "val_loss" in val:
            bpb = f", {val['val_bpb']:.3f} bits/byte" if "val_bpb" in val else ""
            parts.append(f"val loss {val['val_loss']:.4f} (ppl {val['val_ppl']:.2f}{bpb})")
        if result.tok_per_s:
            mfu = f", MFU {result.mfu:.1%}" if result.mfu else ""
            parts.append(f"{result.tok_per_s:,.0f} tok/s{mfu}")
        line = "pretrain: " + ", ".join(parts)
        if result.model_dir:
            line += f"; model in {result.model_dir}"
        elif result.exit_code and result.checkpoint:
            line += f"; no model written (stopped early), checkpoint {result.checkpoint}: run again to resume"
        payload = {k: v for k, v in vars(result).items()}
        return line, payload


__all__ = ["PretrainBatches", "PretrainTask", "bytes_per_token", "math_fields", "mixture_schedule",
           "mixture_sources", "resolve_model_config", "resolve_tokenizer_dir"]
