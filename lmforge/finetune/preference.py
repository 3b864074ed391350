"""Preference tuning (``finetune.mode: dpo``): the DPO family of losses on the shared Trainer.

Losses on per-pair sequence log-probabilities (``logp = Σ log π(y_t | x, y_<t)`` over the completion tokens
only; ``avg = logp / |y|``), ``β = dpo.beta``:

    sigmoid  (DPO, Rafailov et al. 2023)  z = β[(logp_c − ref_c) − (logp_r − ref_r)]
             loss = −(1 − ε) log σ(z) − ε log σ(−z)            ε = dpo.label_smoothing (cDPO)
    ipo      (Azar et al. 2023, length-normalised as TRL)
             loss = ((logp_c − ref_c)/|y_c| − (logp_r − ref_r)/|y_r| − 1/(2β))²
    simpo    (Meng et al. 2024, reference-free)   loss = −log σ(β·avg_c − β·avg_r − γ)   γ = dpo.gamma
    orpo     (Hong et al. 2024, reference-free)
             loss = −avg_c + λ · (−log σ(log odds_c − log odds_r)),  odds = p/(1−p), p = exp(avg)   λ = dpo.lambda

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

from lmforge.config import UserError
from lmforge.console import info
from lmforge.finetune.data import IGNORE_INDEX

LOSSES = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
REF_FILE = "reference_logps.safetensors"
REF_META = "reference_logps.json"


# ================================================================================================
# Log-probabilities and losses
# ================================================================================================
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled targets per row, and how many there are. logits (B, T, V),
    labels (B, T) shifted targets with IGNORE_INDEX elsewhere -> (B,), (B,)."""
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1), mask.sum(-1)


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


def preference_losses(loss: str, logp_c: torch.Tensor, logp_r: torch.Tensor, n_c: torch.Tensor, n_r: torch.Tensor,
                      ref_c: torch.Tensor | None = None, ref_r: torch.Tensor | None = None, *, beta: float = 0.1,
                      label_smoothing: float = 0.0, gamma: float = 0.5, lam: float = 0.1
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards of chosen and rejected (see the module docstring)."""
    n_c, n_r = n_c.clamp(min=1).to(logp_c.dtype), n_r.clamp(min=1).to(logp_r.dtype)
    if loss in ("sigmoid", "ipo"):
        if ref_c is None or ref_r is None:
            raise ValueError(f"dpo.loss={loss} needs reference log-probs")
        ratio_c, ratio_r = logp_c - ref_c, logp_r - ref_r
        if loss == "sigmoid":
            z = beta * (ratio_c - ratio_r)
            losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        else:
            losses = (ratio_c / n_c - ratio_r / n_r - 1 / (2 * beta)) ** 2
        return losses, beta * ratio_c.detach(), beta * ratio_r.detach()
    avg_c, avg_r = logp_c / n_c, logp_r / n_r
    if loss == "simpo":
        z = beta * (avg_c - avg_r) - gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
        return losses, beta * avg_c.detach(), beta * avg_r.detach()
    if loss == "orpo":
        log_odds = (avg_c - avg_r) - (torch.log1p(-torch.exp(avg_c)) - torch.log1p(-torch.exp(avg_r)))
        losses = -avg_c - lam * F.logsigmoid(log_odds)
        return losses, lam * avg_c.detach(), lam * avg_r.detach()
    raise ValueError(f"dpo.loss={loss} is not one of {', '.join(LOSSES)}")


# ================================================================================================
# The reference model
# ================================================================================================
@contextlib.contextmanager
def adapters_disabled(model):
    """Run ``model`` as its base: every LoRA adapter contributes exactly zero (its scaling set to 0)."""
    from lmforge.models.lora import LoRALinear

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
        from lmforge.distributed.world import unwrap

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
        from lmforge.train.batches import to_device

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
    from safetensors.torch import load_file, save_file

    from lmforge.data.preference_pairs import collate_pairs
    from lmforge.distributed.world import barrier
    from lmforge.models.lora import LoRALinear

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
            from lmforge.atomic import atomic_write_text

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
# The recipe's pieces
# ================================================================================================
def reference_kind(cfg) -> str | None:
    d = cfg.dpo
    if d.loss in REFERENCE_FREE:
        return None
    if d.precompute_ref:
        return "precomputed"
    return "lora" if cfg.uses_lora else "copy"


def prepare_pairs(cfg, tokenizer, mcfg, world, device):
    """Read, split and encode the pairs -> (Prepared without batches, train pairs, dev pairs)."""
    from lmforge.data.preference_pairs import encode_pairs, load_pairs
    from lmforge.finetune.recipes import Prepared, _check_ids, read_train_dev
    from lmforge.tokenizer.chat_template import get_chat_template

    d = cfg.data
    template = get_chat_template(tokenizer, d.chat_template)
    train, dev = read_train_dev(load_pairs, d, cfg.train.seed)
    max_prompt = cfg.dpo.max_prompt_len
    train_ds = encode_pairs(tokenizer, train, d.seq_len, template, max_prompt)
    _check_ids(train_ds.prompt + train_ds.chosen + train_ds.rejected, mcfg.vocab_size, "data.train")
    dev_ds = None
    if dev and cfg.eval.batches:
        dev_ds = encode_pairs(tokenizer, dev, d.seq_len, template, max_prompt)
        _check_ids(dev_ds.prompt + dev_ds.chosen + dev_ds.rejected, mcfg.vocab_size, "data.dev")
    stats = {"train": train_ds.stats, **({"dev": dev_ds.stats} if dev_ds else {})}
    if world.is_main:
        s = train_ds.stats
        if s["prompt_truncated"] or s["completion_truncated"] or s["dropped"]:
            info(f"data.train: {s['prompt_truncated']} prompts and {s['completion_truncated']} pairs' completions cut "
                 f"to data.seq_len={d.seq_len}; {s['dropped']} pairs dropped (no room for a reply)")
    prepared = Prepared(None, units_per_epoch=len(train_ds), n_train=len(train_ds),
                        n_dev=len(dev_ds) if dev_ds else 0, stats=stats, template=template)
    return prepared, train_ds, dev_ds


def prepare_dpo(cfg, tokenizer, mcfg, world, device):
    """The data stage of ``finetune.mode: dpo`` (the batch source is built by `dpo_objective`, which knows
    whether reference log-probs are attached)."""
    prepared, train_ds, dev_ds = prepare_pairs(cfg, tokenizer, mcfg, world, device)
    prepared.pairs = (train_ds, dev_ds)
    return prepared


def dpo_objective(cfg, model, prepared, tokenizer, world, device, math_fields: dict[str, Any]):
    """Batch source, loss_fn and eval_fn of a DPO run on ``model`` (the policy, LoRA already applied).

    Builds the reference first: a frozen copy of ``model`` as it is now, or the precomputed log-probs."""
    from lmforge.data.preference_pairs import PairBatches, fixed_batches
    from lmforge.finetune.recipes import _pad_id

    train_ds, dev_ds = prepared.pairs
    pad_id = _pad_id(tokenizer)
    kind = reference_kind(cfg)
    d = cfg.dpo
    extra_train = extra_dev = None
    ref_model = None
    if kind == "precomputed":
        splits = {"train": train_ds, **({"dev": dev_ds} if dev_ds is not None else {})}
        refs = precompute_reference(model, splits, Path(cfg.run.dir),
                                    {"model.base": math_fields.get("model.base"), "data.seq_len": cfg.data.seq_len,
                                     "chat_template": math_fields.get("chat_template")},
                                    cfg.eval.batch_size or cfg.train.micro_batch, pad_id, device, world)
        extra_train = attach(refs["train"])
        extra_dev = attach(refs["dev"]) if dev_ds is not None else None
    elif kind == "copy":
        ref_model = frozen_copy(model)
    loss = PreferenceLoss(d.loss, beta=d.beta, label_smoothing=d.label_smoothing, gamma=d.gamma, lam=d.lambda_,
                          reference=kind, ref_model=ref_model, pad_id=pad_id)
    prepared.batches = PairBatches(train_ds, cfg.global_batch_size, rank=world.dp_rank, world_size=world.dp_size,
                                   seed=cfg.train.seed, pad_id=pad_id, extra=extra_train)
    if dev_ds is not None:
        bs = cfg.eval.batch_size or cfg.train.micro_batch
        prepared.eval_fn = PreferenceEvaluator(loss, fixed_batches(dev_ds, bs, pad_id, cfg.eval.batches, extra_dev),
                                               device)
    if world.is_main:
        where = {"copy": "a frozen copy of the starting model", "lora": "the base with adapters disabled",
                 "precomputed": f"precomputed in {Path(cfg.run.dir) / REF_FILE}", None: "none (reference-free)"}
        info(f"dpo: loss {d.loss}, beta {d.beta}; reference: {where[kind]}")
    return loss


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


__all__ = ["LOSSES", "PreferenceEvaluator", "PreferenceLoss", "adapters_disabled", "dpo_objective",
           "frozen_copy", "pair_logps", "precompute_reference", "preference_losses", "preference_metrics",
           "prepare_dpo", "sequence_logps"]
