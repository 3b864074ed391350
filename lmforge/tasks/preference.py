"""Preference tuning (``finetune.mode: dpo``): the DPO family of losses on the shared Trainer
(`PreferenceTask`; full fine-tuning, or LoRA with ``dpo.lora: true``).

The losses (sigmoid/DPO, IPO, SimPO, ORPO; ``β = dpo.beta``, ``ε = dpo.label_smoothing``, ``γ = dpo.gamma``,
``λ = dpo.lambda``) are written out in `lmforge.train.losses.preference_losses`, on per-pair sequence
log-probabilities (`sequence_logps`) of one forward over chosen and rejected rows (`pair_logps`, here).

``loss_fn`` returns the *sum* of per-pair losses and the number of pairs; the Trainer divides by the
global number of pairs, so the optimised loss is the mean over pairs of a global batch.

Reference model (sigmoid and ipo): the starting model, frozen —
  * full fine-tuning: a frozen copy in memory (``dpo.precompute_ref: false``), or
  * LoRA (``dpo.lora: true``): the policy itself with every adapter switched off (no second copy), or
  * ``dpo.precompute_ref: true``: reference log-probs of every train and dev pair computed once before the
    first step with the starting model and stored in ``RUN/reference_logps.safetensors`` (+ ``.json``); a
    resumed run reads them (an interrupted precomputation continues where it stopped).

Metrics of every evaluation, named as TRL names them: ``rewards/chosen``, ``rewards/rejected`` (means of
``β (logp − ref)``; reference-free losses use ``β·avg`` (simpo) and ``λ·avg`` (orpo)), ``rewards/accuracies``
(fraction of pairs with chosen reward > rejected reward), ``rewards/margins``, ``logps/chosen``,
``logps/rejected`` (summed log-probs; averaged for simpo/orpo) and ``val_loss`` (mean per-pair loss).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lmforge.atomic import atomic_write_text
from lmforge.config import UserError
from lmforge.console import info
from lmforge.data.preference_pairs import (
    PairBatches,
    collate_pairs,
    encode_pairs,
    fixed_batches,
    identical_warning,
    load_pairs,
)
from lmforge.data.sft import IGNORE_INDEX
from lmforge.distributed.world import barrier, unwrap
from lmforge.models.lora import LoRALinear
from lmforge.tasks.base import RunResult
from lmforge.tasks.finetuning import FinetuneTask, check_ids, pad_id, read_train_dev
from lmforge.tokenizer.chat_template import get_chat_template
from lmforge.train.batches import to_device
from lmforge.train.losses import REFERENCE_FREE, preference_losses, sequence_logps

REF_FILE = "reference_logps.safetensors"
REF_META = "reference_logps.json"


# ================================================================================================
# Log-probabilities of pairs (the losses are `lmforge.train.losses.preference_losses`)
# ================================================================================================
def _pad_to(t: torch.Tensor, T: int, value: int) -> torch.Tensor:
    return t if t.size(1) == T else F.pad(t, (0, T - t.size(1)), value=value)


def pair_logps(model, batch: dict[str, torch.Tensor], pad_id: int = 0
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over chosen and rejected rows together -> (logp_c, logp_r, n_c, n_r), each (B,)."""
    ct, rt = batch["chosen_tokens"], batch["rejected_tokens"]
    T = max(ct.size(1), rt.size(1))
    tokens = torch.cat([_pad_to(ct, T, pad_id), _pad_to(rt, T, pad_id)])  # (2B, T)
    labels = torch.cat([_pad_to(batch["chosen_labels"], T, IGNORE_INDEX),
                        _pad_to(batch["rejected_labels"], T, IGNORE_INDEX)])
    logps, counts = sequence_logps(model(tokens), labels)
    B = ct.size(0)
    return logps[:B], logps[B:], counts[:B], counts[B:]


# ================================================================================================
# The reference model
# ================================================================================================
@contextlib.contextmanager
def adapters_disabled(model):
    """Run ``model`` as its base: every LoRA adapter contributes exactly zero (its scaling set to 0)."""
    saved = [(m, m.scaling) for m in model.modules() if isinstance(m, LoRALinear)]
    if not saved:
        raise UserError("the reference is the base with adapters disabled, but the model has no LoRA adapters")
    try:
        for m, _ in saved:
            m.scaling = 0.0
        yield model
    finally:
        for m, s in saved:
            m.scaling = s


@contextlib.contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def frozen_copy(model):
    """A frozen, eval-mode copy of the starting model (the full-fine-tuning reference)."""
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


@torch.no_grad()
def reference_logps(kind: str, model, ref_model, batch: dict[str, torch.Tensor], pad_id: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ref_c, ref_r) for a batch: from the batch (``precomputed``), a frozen copy, or the LoRA base."""
    if kind == "precomputed":
        return batch["ref_chosen"], batch["ref_rejected"]
    if kind == "copy":
        c, r, _, _ = pair_logps(ref_model, batch, pad_id)
        return c, r
    if kind == "lora":
        base = unwrap(model)
        with _eval_mode(base), adapters_disabled(base):
            c, r, _, _ = pair_logps(base, batch, pad_id)
        return c, r
    raise ValueError(f"unknown reference kind {kind}")


class PreferenceLoss:
    """``loss_fn(model, batch) -> (Σ per-pair loss, pairs)`` for the Trainer, and the per-pair details
    (`details`) the evaluation aggregates."""

    def __init__(self, loss: str = "sigmoid", *, beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 0.5,
                 lam: float = 0.1, reference: str | None = "copy", ref_model=None, pad_id: int = 0):
        self.loss, self.beta, self.label_smoothing, self.gamma, self.lam = loss, beta, label_smoothing, gamma, lam
        self.reference = None if loss in REFERENCE_FREE else reference
        self.ref_model = ref_model
        self.pad_id = pad_id
        if self.reference == "copy" and ref_model is None:
            raise ValueError("reference='copy' needs ref_model")

    def details(self, model, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logp_c, logp_r, n_c, n_r = pair_logps(model, batch, self.pad_id)
        ref_c = ref_r = None
        if self.reference is not None:
            ref_c, ref_r = reference_logps(self.reference, model, self.ref_model, batch, self.pad_id)
            ref_c, ref_r = ref_c.to(logp_c), ref_r.to(logp_r)
        losses, rew_c, rew_r = preference_losses(self.loss, logp_c, logp_r, n_c, n_r, ref_c, ref_r, beta=self.beta,
                                                 label_smoothing=self.label_smoothing, gamma=self.gamma, lam=self.lam)
        shown_c, shown_r = logp_c.detach(), logp_r.detach()
        if self.loss in REFERENCE_FREE:
            shown_c, shown_r = shown_c / n_c.clamp(min=1), shown_r / n_r.clamp(min=1)
        return {"losses": losses, "rewards_chosen": rew_c, "rewards_rejected": rew_r, "logps_chosen": shown_c,
                "logps_rejected": shown_r}

    def __call__(self, model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        losses = self.details(model, batch)["losses"]
        return losses.sum(), torch.tensor(losses.numel())


def preference_metrics(parts: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """TRL-named means over all pairs of the evaluated batches."""
    cat = {k: torch.cat([p[k].detach().double().cpu() for p in parts]) for k in parts[0]}
    margins = cat["rewards_chosen"] - cat["rewards_rejected"]
    return {"val_loss": float(cat["losses"].mean()),
            "rewards/chosen": float(cat["rewards_chosen"].mean()),
            "rewards/rejected": float(cat["rewards_rejected"].mean()),
            "rewards/accuracies": float((margins > 0).double().mean()),
            "rewards/margins": float(margins.mean()),
            "logps/chosen": float(cat["logps_chosen"].mean()),
            "logps/rejected": float(cat["logps_rejected"].mean())}


class PreferenceEvaluator:
    """``eval_fn`` for the Trainer: every rank scores the whole (capped) dev split in the same batches, so
    the metrics agree across ranks without communication."""

    def __init__(self, loss: PreferenceLoss, batches: list[dict[str, torch.Tensor]], device):
        self.loss, self.batches, self.device = loss, batches, device
        self.n = sum(int(b["index"].numel()) for b in batches)

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        parts = [self.loss.details(model, to_device(b, self.device)) for b in self.batches]
        return preference_metrics(parts) if parts else {}


# ================================================================================================
# Precomputed reference log-probs (RUN/reference_logps.*)
# ================================================================================================
def _pairs_fingerprint(data) -> str:
    h = hashlib.sha256()
    for p, c, r in zip(data.prompt, data.chosen, data.rejected):
        h.update(json.dumps([p, c, r]).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def precompute_reference(model, splits: dict[str, Any], run_dir: Path, identity: dict[str, Any], batch_size: int,
                         pad_id: int, device, world, chunk_batches: int = 16) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Reference log-probs (chosen, rejected) of every pair of every split, computed with ``model`` as it
    is now (adapters switched off when it has any) and saved in ``run_dir``. A file from the same base,
    data and settings is reused; an interrupted computation continues from its last saved chunk.

    Ranks split each chunk's batches (rank r takes every world-th) and sum the results."""
    identity = {**identity, **{f"pairs.{k}": _pairs_fingerprint(v) for k, v in splits.items()}}
    path, meta_path = Path(run_dir) / REF_FILE, Path(run_dir) / REF_META
    store: dict[str, torch.Tensor] = {}
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("identity") == identity:
            store = load_file(str(path))
        elif world.is_main:
            info(f"note: {path} was computed for another base model, data or seq_len; recomputing it")
    for name, data in splits.items():
        for key in ("chosen", "rejected"):
            if store.get(f"{name}.{key}") is None or store[f"{name}.{key}"].numel() != len(data):
                store[f"{name}.{key}"] = torch.zeros(len(data), dtype=torch.float64)
                store[f"{name}.done"] = torch.zeros(len(data), dtype=torch.bool)
    has_lora = any(isinstance(m, LoRALinear) for m in model.modules())
    ctx = adapters_disabled(model) if has_lora else contextlib.nullcontext()
    todo_total = sum(int((~store[f"{n}.done"]).sum()) for n in splits)
    if todo_total and world.is_main:
        info(f"dpo: computing reference log-probs of {todo_total:,} pairs once (dpo.precompute_ref) -> {path}")

    def save() -> None:
        if world.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            save_file({k: v.contiguous() for k, v in store.items()}, str(tmp))
            os.replace(tmp, path)
            done = {n: int(store[f"{n}.done"].sum()) for n in splits}
            atomic_write_text(meta_path, json.dumps({"identity": identity, "done": done}, indent=1))
        barrier()

    with _eval_mode(model), ctx:
        for name, data in splits.items():
            done = store[f"{name}.done"]
            todo = [i for i in range(len(data)) if not bool(done[i])]
            batches = [todo[s:s + batch_size] for s in range(0, len(todo), batch_size)]
            for c0 in range(0, len(batches), chunk_batches):
                chunk = batches[c0:c0 + chunk_batches]
                vals = torch.zeros(2, len(data), dtype=torch.float64, device=device)  # NCCL sums device tensors
                for b, idx in enumerate(chunk):
                    if b % world.dp_size != world.dp_rank:
                        continue
                    batch = {k: v.to(device) for k, v in collate_pairs(data, idx, pad_id).items()}
                    c, r, _, _ = pair_logps(model, batch, pad_id)
                    vals[0, idx] = c.double()
                    vals[1, idx] = r.double()
                vals = world.all_reduce_sum(vals).cpu()
                flat = [i for idx in chunk for i in idx]
                store[f"{name}.chosen"][flat] = vals[0, flat]
                store[f"{name}.rejected"][flat] = vals[1, flat]
                done[flat] = True
                save()
    if not todo_total and not path.is_file():
        save()
    return {n: (store[f"{n}.chosen"].float(), store[f"{n}.rejected"].float()) for n in splits}


def attach(ref: tuple[torch.Tensor, torch.Tensor]):
    """``extra`` for a batch source: the precomputed reference log-probs of the batch's pairs."""
    chosen, rejected = ref

    def extra(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        idx = batch["index"]
        return {"ref_chosen": chosen[idx], "ref_rejected": rejected[idx]}

    return extra


# ================================================================================================
# The task
# ================================================================================================
class PairsTask(FinetuneTask):
    """A task trained on preference pairs (prompt, chosen, rejected): DPO here, reward modelling in
    `lmforge.tasks.reward`. ``read_data`` reads, splits and encodes them (``train_ds``, ``dev_ds``)."""

    unit = "pairs"

    def read_data(self, world, device) -> None:
        cfg, d = self.cfg, self.cfg.data
        template = get_chat_template(self.tokenizer, d.chat_template)
        train, dev = read_train_dev(load_pairs, d, cfg.train.seed)
        max_prompt = cfg.dpo.max_prompt_len
        train_ds = encode_pairs(self.tokenizer, train, d.seq_len, template, max_prompt)
        check_ids(train_ds.prompt + train_ds.chosen + train_ds.rejected, self.mcfg.vocab_size, "data.train")
        dev_ds = None
        if dev and cfg.eval.batches:
            dev_ds = encode_pairs(self.tokenizer, dev, d.seq_len, template, max_prompt)
            check_ids(dev_ds.prompt + dev_ds.chosen + dev_ds.rejected, self.mcfg.vocab_size, "data.dev")
        self.stats = {"train": train_ds.stats, **({"dev": dev_ds.stats} if dev_ds else {})}
        if world.is_main:
            s = train_ds.stats
            for split, st in self.stats.items():
                if (warning := identical_warning(st, f"data.{split}")) is not None:
                    info(warning)
            if s["prompt_truncated"] or s["completion_truncated"] or s["dropped"]:
                info(f"data.train: {s['prompt_truncated']} prompts and {s['completion_truncated']} pairs' completions "
                     f"cut to data.seq_len={d.seq_len}; {s['dropped']} pairs dropped (no room for a reply)")
        self.units_per_epoch, self.n_train = len(train_ds), len(train_ds)
        self.n_dev = len(dev_ds) if dev_ds else 0
        self.template, self.train_ds, self.dev_ds = template, train_ds, dev_ds
        self.pad = pad_id(self.tokenizer)


def reference_kind(cfg) -> str | None:
    d = cfg.dpo
    if d.loss in REFERENCE_FREE:
        return None
    if d.precompute_ref:
        return "precomputed"
    return "lora" if cfg.dpo.lora else "copy"


def math_fields(cfg) -> dict[str, Any]:
    d = cfg.dpo
    out = {"dpo.loss": d.loss, "dpo.beta": d.beta, "dpo.max_prompt_len": d.max_prompt_len}
    if d.loss in ("sigmoid", "simpo"):
        out["dpo.label_smoothing"] = d.label_smoothing
    if d.loss == "simpo":
        out["dpo.gamma"] = d.gamma
    if d.loss == "orpo":
        out["dpo.lambda"] = d.lambda_
    return out


class PreferenceTask(PairsTask):
    """``finetune.mode: dpo``: the loss needs the starting model (its reference), so `loss` builds the
    reference (a frozen copy, the LoRA base, or precomputed log-probs), then the batch source (which
    carries precomputed log-probs) and the dev evaluation."""

    name = "dpo"

    def what(self) -> str:
        return f"preference tuning ({'LoRA' if self.uses_lora() else 'full'})"

    def task_fields(self) -> dict[str, Any]:
        return {**self.chat_fields(), **math_fields(self.cfg)}

    def loss(self, model) -> PreferenceLoss:
        """The policy ``model`` (LoRA already applied) as it is now is the reference: built here, before the
        first step, together with the batch source and the dev evaluation."""
        cfg, world, device, pad = self.cfg, self.world, self.device, self.pad
        train_ds, dev_ds = self.train_ds, self.dev_ds
        fields = self.math_fields()
        kind = reference_kind(cfg)
        d = cfg.dpo
        extra_train = extra_dev = None
        ref_model = None
        if kind == "precomputed":
            splits = {"train": train_ds, **({"dev": dev_ds} if dev_ds is not None else {})}
            refs = precompute_reference(model, splits, self.run_dir,
                                        {"model.base": fields.get("model.base"),
                                         "data.seq_len": cfg.data.seq_len,
                                         "chat_template": fields.get("chat_template")},
                                        cfg.eval.batch_size or cfg.train.micro_batch, pad, device, world)
            extra_train = attach(refs["train"])
            extra_dev = attach(refs["dev"]) if dev_ds is not None else None
        elif kind == "copy":
            ref_model = frozen_copy(model)
        loss = PreferenceLoss(d.loss, beta=d.beta, label_smoothing=d.label_smoothing, gamma=d.gamma, lam=d.lambda_,
                              reference=kind, ref_model=ref_model, pad_id=pad)
        self.batches = PairBatches(train_ds, cfg.global_batch_size, rank=world.dp_rank, world_size=world.dp_size,
                                   seed=cfg.train.seed, pad_id=pad, extra=extra_train)
        if dev_ds is not None:
            bs = cfg.eval.batch_size or cfg.train.micro_batch
            self._eval = PreferenceEvaluator(loss, fixed_batches(dev_ds, bs, pad, cfg.eval.batches, extra_dev),
                                             device)
        if world.is_main:
            where = {"copy": "a frozen copy of the starting model", "lora": "the base with adapters disabled",
                     "precomputed": f"precomputed in {self.run_dir / REF_FILE}", None: "none (reference-free)"}
            info(f"dpo: loss {d.loss}, beta {d.beta}; reference: {where[kind]}")
        return loss

    def save_dir(self, model, out: Path, weights_step: int) -> None:
        self.save_lm_dir(model, out, weights_step)

    @classmethod
    def metrics_text(cls, val: dict[str, float], res: RunResult) -> list[str]:
        if "rewards/accuracies" in val:
            return [(f"dev rewards/accuracies {val['rewards/accuracies']:.3f}, rewards/margins "
                    f"{val['rewards/margins']:.4g}, val loss {val['val_loss']:.4f}")]
        return super().metrics_text(val, res)


__all__ = ["PairsTask", "PreferenceEvaluator", "PreferenceLoss", "PreferenceTask", "adapters_disabled",
           "frozen_copy", "pair_logps", "precompute_reference", "preference_metrics"]
