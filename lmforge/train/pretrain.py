"""The pretraining recipe: config -> (checks) -> shard loader + model -> Trainer.fit() -> RUN/model.

Every check that can fail on the user's input runs before the model is built or a batch is read.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError, to_dict
from lmforge.console import info
from lmforge.train.config import PretrainConfig, grad_accum_steps
from lmforge.train.rank_output import note  # notes every rank would repeat: rank 0 only

# Config fields whose change alters the math a checkpoint encodes; a resume refuses to mix them.
MATH_DATA_FIELDS = ("seq_len", "doc_mask")


class PretrainBatches:
    """The trainer's batch source over a ShardLoader.

    With ``doc_mask`` the loader yields (tokens, doc_ids), turned here into the causal-LM batch dict
    with an attention mask and positions that restart in every packed document. On resume, a loader
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
        from lmforge.data.loader import document_mask, document_positions

        tokens, doc_ids = item
        ids = doc_ids[:, :-1]  # inputs are tokens[:, :-1]
        return {"tokens": tokens, "mask": document_mask(ids), "positions": document_positions(ids)}

    def next_batch(self):
        item = self.loader.next_batch()
        return self.convert(item) if self.doc_mask else item

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        from lmforge.config import UserError

        try:
            self.loader.load_state_dict(state)
            return
        except UserError as e:
            if not self.allow_data_change:
                raise UserError(f"{e}; or continue on the new data with checkpoint.allow_mismatch=[data.dir]") from None
        tokens_seen = int(state["samples_seen"]) * int(state.get("seq_len") or self.loader.seq_len)
        self.loader.samples_seen = tokens_seen // self.loader.seq_len
        note(f"note: data changed since the checkpoint; continuing after {tokens_seen:,} tokens "
             f"({self.loader.samples_seen:,} samples of the new data)")


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
        note(f"note: the tokenizer dir recorded in {cfg.data.dir}/index.json ({path}) is gone; RUN/model will "
             "have no tokenizer files (set data.tokenizer to copy them)")
        return None
    return str(path)


def bytes_per_token(batches, tokenizer_dir: str | None, expected_hash: str | None) -> float | None:
    """UTF-8 bytes per target token of the validation batches (decoded with the tokenizer): turns val
    loss into bits per byte, which compares across tokenizers."""
    if tokenizer_dir is None:
        return None
    from lmforge.tokenizer import load_tokenizer

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


def pretrain(cfg: PretrainConfig, config_path: str | None = None):
    """Run (or resume) pretraining per ``cfg``; returns the Trainer's TrainResult."""
    import torch

    from lmforge.data.loader import ShardLoader
    from lmforge.data.shards import read_index
    from lmforge.distributed.world import build_for_world, failure_guard, setup_world
    from lmforge.models.model_dir import save_model_dir
    from lmforge.models.transformer import build_model
    from lmforge.train.batches import CausalLMLoss
    from lmforge.train.resume import check_compatible, find_resume
    from lmforge.train.trainer import Trainer

    # ---- checks (no work yet) ----
    index = read_index(cfg.data.dir)
    data_vocab = int(index.get("vocab_size") or 0)
    mcfg = resolve_model_config(cfg, data_vocab)
    mlm = None
    if cfg.train.objective == "mlm":  # BERT: a mask id (the tokenizer's, or one extra row) and its specials
        from lmforge.models.heads import mask_token_id
        from lmforge.tokenizer import load_tokenizer

        tok_dir = resolve_tokenizer_dir(cfg, index)
        mlm_tok = load_tokenizer(tok_dir) if tok_dir else None
        mask_id, need = mask_token_id(mlm_tok, data_vocab)
        if mcfg.vocab_size < need:
            cfg.model = {**cfg.model, "vocab_size": need}
            mcfg = cfg.model_config()
        mlm = (mask_id, sorted(set(mlm_tok.special_tokens.values())) if mlm_tok else [])
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    world, device = setup_world(cfg.train.device, cfg.parallel)
    grad_accum_steps(cfg.global_batch_size, cfg.train.micro_batch, world.dp_size)
    total_steps = cfg.steps_for()
    run_dir = Path(cfg.run.dir)
    fields = math_fields(mcfg, cfg, index)
    resume_from = find_resume(run_dir, cfg.train.resume)
    resume_notes = [] if resume_from is None else check_compatible(resume_from, fields, cfg.checkpoint.allow_mismatch)
    tokenizer_dir = resolve_tokenizer_dir(cfg, index)
    cfg.data.tokenizer = tokenizer_dir
    loader = ShardLoader(cfg.data.dir, "train", cfg.data.seq_len, cfg.global_batch_size, rank=world.dp_rank,
                         world_size=world.dp_size, seed=cfg.train.seed, check_vocab=mcfg.vocab_size,
                         tokenizer_hash=index.get("tokenizer_hash"), doc_mask=cfg.data.doc_mask,
                         cache_dir=cfg.data.cache_dir)
    source = PretrainBatches(loader, cfg.data.doc_mask,
                             any(k.startswith("data.") for k in cfg.checkpoint.allow_mismatch))
    val_batches = None
    has_val = bool(index["splits"].get("val", {}).get("tokens"))
    if cfg.eval.batches and has_val:
        eval_bs = cfg.eval.batch_size or cfg.train.micro_batch

        def val_batches():  # the whole set on every rank; the Trainer shares it out evenly
            batches = loader.eval_batches(cfg.eval.batches, eval_bs)
            return map(PretrainBatches.convert, batches) if cfg.data.doc_mask else batches
    elif cfg.eval.batches:
        note(f"note: {cfg.data.dir} has no val split; no validation loss (prepare with --val-fraction 0.01)")
    bpt = None
    if val_batches is not None:
        bpt = bytes_per_token(loader.eval_batches(cfg.eval.batches, cfg.eval.batch_size or cfg.train.micro_batch),
                              tokenizer_dir, index.get("tokenizer_hash"))
    resolved = to_dict(cfg)
    resolved["model"] = {"preset": cfg.model.get("preset"), **to_dict(mcfg)} if cfg.model.get("preset") \
        else to_dict(mcfg)
    if cfg.model.get("init_embeddings_from"):
        resolved["model"]["init_embeddings_from"] = cfg.model["init_embeddings_from"]
    if world.is_main:
        accum = grad_accum_steps(cfg.global_batch_size, cfg.train.micro_batch, world.dp_size)
        info(f"pretrain: {mcfg.num_params() / 1e6:,.1f}M params, {total_steps:,} steps x "
             f"{cfg.global_batch_size} seqs x {cfg.data.seq_len} tokens (micro {cfg.train.micro_batch} x "
             f"{accum} accumulation x {world.dp_size} ranks) on {device}; run dir {run_dir}")

    # ---- work ----
    extra = {"trained_with": "lmforge pretrain", "tokenizer_hash": index.get("tokenizer_hash")}
    vectors = cfg.model.get("init_embeddings_from")
    base_dir = cfg.model.get("from") if resume_from is None else None  # a resume reads the checkpoint instead
    if base_dir and (vectors or mlm is not None):
        raise ConfigError("model.from continues a causal LM's pretraining; drop model.init_embeddings_from and "
                          "train.objective=mlm (they start a new model)")
    if (vectors and resume_from is None) or mlm is not None:  # these edit the whole model once it exists
        model = build_model(mcfg, device=device, dtype=torch.float32, seed=cfg.train.seed, init=resume_from is None)
    else:  # on the meta device when the job shards parameters; each rank fills only its shards
        model = build_for_world(mcfg, world, device, seed=cfg.train.seed, init=resume_from is None,
                                model_dir=base_dir)
    if base_dir:
        extra["continued_from"] = str(Path(base_dir).resolve())
    if vectors and resume_from is None:  # word2vec / GloVe / fastText rows for the tokens that spell words
        from lmforge.models.embedding_init import coverage_line, init_embeddings_from
        from lmforge.tokenizer import load_tokenizer

        if tokenizer_dir is None:
            raise ConfigError("model.init_embeddings_from needs the data's tokenizer; set data.tokenizer")
        report = init_embeddings_from(model, load_tokenizer(tokenizer_dir), vectors, seed=cfg.train.seed)
        extra["init_embeddings_from"] = report
        if world.is_main:
            info(coverage_line(report))
    loss_fn = CausalLMLoss.from_config(cfg.train)  # train.loss_chunk_tokens, train.z_loss
    save_fn = save_model_dir
    if mlm is not None:
        from lmforge.models.heads import attach_mlm_head, mlm_objective, save_model_dir_with_heads

        attach_mlm_head(model, seed=cfg.train.seed)
        loss_fn = mlm_objective(mlm[0], mcfg.vocab_size, mlm[1], seed=cfg.train.seed)
        save_fn = save_model_dir_with_heads

    def save_model(m, out):
        save_fn(m, out, tokenizer_dir=tokenizer_dir, extra=extra)

    trainer = Trainer(cfg, model, source, val_batches, loss_fn, total_steps=total_steps, world=world, device=device,
                      config_dict=resolved, math_fields=fields, flops_per_token=mcfg.flops_per_token(cfg.data.seq_len),
                      bytes_per_token=bpt, save_model=save_model, resume_from=resume_from,
                      resume_notes=resume_notes)
    with failure_guard(world):  # a rank that fails or dies makes the others exit, naming it
        result = trainer.fit()
    world.close()  # the run ended: a process group lmforge created is destroyed at exit
    return result


def summary(result) -> tuple[str, dict[str, Any]]:
    """The one-line CLI summary and the --json payload."""
    from lmforge.train.metrics import format_duration

    val = result.val or {}
    reason = result.signal if result.stop_reason == "signal" and result.signal else result.stop_reason
    parts = [(f"{reason.replace('_', ' ')} at step {result.step:,} ({result.tokens:,} tokens) "
             f"in {format_duration(result.elapsed_s)}")]
    if result.final_loss is not None and math.isfinite(result.final_loss):
        parts.append(f"loss {result.final_loss:.4f}")
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


__all__ = ["PretrainBatches", "bytes_per_token", "math_fields", "pretrain", "resolve_model_config", "summary"]
