"""Every training loss of lmforge, in one module.

- the causal language-model loss (`CausalLMLoss`, `next_token_loss`, `causal_lm_loss`): next-token
  cross-entropy summed over the targets, computed in chunks of tokens from the final hidden states
  (`lm_head_loss`, below);
- the masked language-model loss (`MaskedLMLoss`, `masked_lm_loss`): BERT's objective over the masked
  positions (the masking recipe itself is `lmforge.models.heads.mask_tokens`);
- instruction tuning's loss on already-shifted labels (`ShiftedLabelsLoss`, the same chunked cross-entropy);
- the classification loss (`classify_loss`);
- the preference-tuning family (`preference_losses`: sigmoid/DPO, IPO, SimPO, ORPO) on per-pair sequence
  log-probabilities (`sequence_logps`); the task (`lmforge.tasks.preference`) supplies the reference model.
  (Reward modelling's Bradley–Terry loss is `lmforge.eval.pairwise.bradley_terry`, which its evaluation
  shares; eval never imports train.)
- online RL with verifiable rewards (GRPO, Dr. GRPO; `GRPOLoss`, `grpo_token_losses`, `group_advantages`): the
  clipped policy-gradient objective on per-token log-probabilities of sampled completions
  (`completion_logps`); the task (`lmforge.tasks.grpo`) supplies rollouts, rewards and the reference.

Every loss is ``loss_fn(model, batch) -> (loss_sum, n_targets)``: the summed loss and how many targets it
covers; the Trainer normalizes by the global count.

A model whose forward computes a loss head inside itself says so with a class attribute
``accepts_loss_head = True`` (the lmforge `Transformer`): the chunked loss then runs inside that forward
(FSDP2 gathers the head's weight around it). Any other model's logits are used whole.

The chunked LM-head loss
------------------------
The language-model loss over the final hidden states, in chunks of tokens, so the fp32 logits of the
whole batch never exist at once (at a 32k–128k vocabulary they are the largest tensor of a step).

    loss_sum, z_sum = lm_head_loss(h, head, targets, chunk=1024, softcap=None, z_loss=0.0)

``h`` (B, T, dim) are the final norm's hidden states, ``head`` the model's LM head module
(``model.output``; tied to the embedding or not), ``targets`` (B, T) with -100 = not a target. Per chunk
of ``chunk`` tokens: logits = head(h_chunk) in fp32, optional soft-capping cap·tanh(logits/cap), then
cross-entropy (summed) and, when ``z_loss`` > 0, z_loss · logsumexp² (summed; PaLM's auxiliary loss
that keeps the softmax normalizer near 1). Three paths, chosen by what the head is:

- **fused** (a plain ``nn.Linear`` without bias or hooks: the pretraining head, tied or not): one autograd
  Function computes each chunk's loss AND its gradients for ``h`` and the head weight in the forward pass
  (softmax − one-hot, through the cap's derivative) and keeps only those two gradients (the size of ``h``
  and of the weight), never a chunk's logits; backward scales them by the incoming gradient. Three head
  matmuls per chunk, the same as the unchunked loss — no recomputation.
- **checkpointed** (any other head module: LoRA-wrapped, with hooks): each chunk calls the module under
  ``torch.utils.checkpoint``, so only the chunk's input is kept and its logits are recomputed in backward.
- **unchunked** (a tensor-parallel head, whose weight is a vocabulary- or sequence-sharded DTensor: its
  module's hooks gather the logits, so it cannot be split here): ``head(h)`` whole, then the same math.

Every path returns the same numbers (fp32: to ~1e-6) and the same gradients as the unchunked loss.
The caller must run this inside the model's forward (`Transformer.forward(..., head=...)`): FSDP2 gathers
the head's weight around that forward only.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.models.heads import IGNORE_INDEX, mask_tokens
from lmforge.models.masks import document_attention_mask

IGNORE = IGNORE_INDEX  # -100: not a target
DEFAULT_LOSS_CHUNK = 1024  # tokens per chunk of the LM-head loss (train.loss_chunk_tokens)


# ================================================================================================
# The causal language-model loss
# ================================================================================================
class CausalLMLoss:
    """``loss_fn(model, batch) -> (loss_sum, n_targets)``: next-token cross-entropy, summed, computed in
    chunks of ``chunk`` tokens from the final hidden states (`lm_head_loss`; 0 = whole logits at once),
    plus ``z_loss`` · logsumexp² per target while the model trains (never in evaluation, so validation loss
    stays pure cross-entropy). The model's ``logit_softcap`` (when its config has one) is applied per chunk.

    batch: tokens (B, T+1), or a dict with ``tokens`` and optional ``mask`` (bool (B, 1, T, T)) or ``doc_ids``,
    ``positions`` (B, T) and ``labels`` (B, T+1; -100 = not a target).
    """

    def __init__(self, chunk: int = DEFAULT_LOSS_CHUNK, z_loss: float = 0.0):
        self.chunk, self.z_loss = int(chunk), float(z_loss)

    @classmethod
    def from_config(cls, train_cfg) -> CausalLMLoss:
        """From the ``train`` section's ``loss_chunk_tokens`` and ``z_loss``."""
        return cls(getattr(train_cfg, "loss_chunk_tokens", DEFAULT_LOSS_CHUNK), getattr(train_cfg, "z_loss", 0.0))

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        mask = positions = labels = doc_ids = None
        if isinstance(batch, dict):
            tokens, mask, positions, labels, doc_ids = (batch["tokens"], batch.get("mask"), batch.get("positions"),
                                                        batch.get("labels"), batch.get("doc_ids"))
        else:
            tokens = batch
        inputs = tokens[:, :-1]  # (B, T)
        targets = (labels if labels is not None else tokens)[:, 1:]  # (B, T)
        loss = next_token_loss(model, inputs, targets, positions=positions, mask=mask, chunk=self.chunk,
                               z_loss=self.z_loss, doc_ids=doc_ids)
        return loss, (targets != IGNORE).sum()


class ShiftedLabelsLoss:
    """``loss_fn(model, batch) -> (loss_sum, n_targets)`` for batches whose ``labels`` (B, T) are already
    shifted next to ``tokens`` (B, T) (instruction tuning: -100 everywhere but the assistant tokens and the
    EOS ending each reply); the same chunked cross-entropy as `CausalLMLoss`."""

    def __init__(self, chunk: int = DEFAULT_LOSS_CHUNK, z_loss: float = 0.0):
        self.chunk, self.z_loss = int(chunk), float(z_loss)

    @classmethod
    def from_config(cls, train_cfg) -> ShiftedLabelsLoss:
        return cls(getattr(train_cfg, "loss_chunk_tokens", DEFAULT_LOSS_CHUNK), getattr(train_cfg, "z_loss", 0.0))

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        labels = batch["labels"]  # (B, T), -100 = no loss
        loss = next_token_loss(model, batch["tokens"], labels, positions=batch.get("positions"),
                               mask=batch.get("mask"), chunk=self.chunk, z_loss=self.z_loss,
                               doc_ids=batch.get("doc_ids"))
        return loss, (labels != IGNORE).sum()


def next_token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *, positions=None, mask=None,
                    chunk: int = DEFAULT_LOSS_CHUNK, z_loss: float = 0.0, doc_ids=None) -> torch.Tensor:
    """Σ cross-entropy (+ Σ z-loss while training) of ``model`` on inputs (B, T) against targets (B, T)
    (-100 = not a target). A model that declares ``accepts_loss_head`` (the lmforge Transformer, also under
    FSDP2/DDP/TP) gets the chunked loss inside its forward; any other model's logits are used whole.

    ``doc_ids`` (B, T) (packed documents; instead of ``mask``): the attention mask is built from them here,
    on their device — a FlexAttention block mask on CUDA, the dense bool mask elsewhere
    (`lmforge.models.masks.document_attention_mask`)."""
    z_loss = z_loss if model.training else 0.0
    core = unwrap_wrappers(model)
    if doc_ids is not None and mask is None:
        mcfg = getattr(core, "cfg", None)
        mask = document_attention_mask(doc_ids[:, :inputs.size(1)], causal=getattr(mcfg, "causal", True),
                                       window=getattr(mcfg, "sliding_window", None))
    softcap = getattr(getattr(core, "cfg", None), "logit_softcap", None) or None
    if accepts_loss_head(core):
        def head(h, output):
            return lm_head_loss(h, output, targets, chunk=chunk, softcap=softcap, z_loss=z_loss)[0]

        return model(inputs, positions=positions, mask=mask, head=head)
    logits = model(inputs, positions=positions, mask=mask)  # (B, T, V)
    if softcap:  # the model's forward applies the cap itself
        softcap = None
    ce, z = loss_terms(logits.flatten(0, 1), targets.flatten(), softcap, z_loss)
    return ce + z


def causal_lm_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy, summed (the default ``CausalLMLoss``: chunked, no z-loss); see there."""
    return _DEFAULT(model, batch)


def accepts_loss_head(model: nn.Module) -> bool:
    """True when ``model``'s forward takes ``head=`` and runs it in place of its LM head (the explicit
    ``accepts_loss_head`` class attribute; no signature inspection)."""
    return bool(getattr(type(model), "accepts_loss_head", False))


def unwrap_wrappers(model: nn.Module) -> nn.Module:
    """The module under DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# ================================================================================================
# The masked language-model loss (``train.objective: mlm``)
# ================================================================================================
def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ cross-entropy over the masked positions, their count): logits (B, T, vocab), labels (B, T) with
    -100 at every position that was not selected for masking."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum", ignore_index=IGNORE)
    return loss, (labels != IGNORE).sum()


class MaskedLMLoss:
    """``loss_fn(model, batch) -> (loss sum, targets)`` for BERT pretraining on token rows: BERT's masking
    (`mask_tokens`), the encoder, its injected ``model.mlm`` head, then `masked_lm_loss`.

    The masks are a function of the batch's content and ``seed`` (not of a global RNG), so a resumed run
    and every evaluation see the same masks for the same rows."""

    def __init__(self, mask_id: int, vocab_size: int, special_ids=(), prob: float = 0.15, seed: int = 0):
        self.mask_id, self.vocab_size, self.special_ids = mask_id, vocab_size, tuple(special_ids)
        self.prob, self.seed = prob, seed

    def __call__(self, model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = batch["tokens"] if isinstance(batch, dict) else batch
        tokens = tokens[:, :-1]  # (B, T): the rows the causal loader cuts (T+1) → T, like the LM objective
        digest = hashlib.blake2b(tokens.detach().cpu().numpy().tobytes(), digest_size=8).digest()
        g = torch.Generator(device="cpu").manual_seed((int.from_bytes(digest, "little") ^ self.seed) & (2**63 - 1))
        inputs, labels = mask_tokens(tokens.cpu(), self.mask_id, self.vocab_size, self.special_ids, self.prob,
                                     generator=g)
        inputs, labels = inputs.to(tokens.device), labels.to(tokens.device)
        core = getattr(model, "module", model)  # under DDP
        h = model(inputs)  # (B, T, dim): an encoder without an LM head returns its hidden states
        return masked_lm_loss(core.mlm(h, core.tok_embeddings.weight), labels)


# ================================================================================================
# Classification
# ================================================================================================
def classify_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over the batch's examples, and how many there are."""
    logits = model(batch["tokens"], batch["lengths"])  # (B, labels)
    loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    return loss, torch.tensor(batch["labels"].numel())  # loss "tokens" = examples; inputs = lengths.sum()



# ================================================================================================
# Preference tuning (``finetune.mode: dpo``)
# ================================================================================================
LOSSES = ("sigmoid", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the labelled targets per row, and how many there are. logits (B, T, V),
    labels (B, T) shifted targets with IGNORE_INDEX elsewhere -> (B,), (B,)."""
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked * mask).sum(-1), mask.sum(-1)


def preference_losses(loss: str, logp_c: torch.Tensor, logp_r: torch.Tensor, n_c: torch.Tensor, n_r: torch.Tensor,
                      ref_c: torch.Tensor | None = None, ref_r: torch.Tensor | None = None, *, beta: float = 0.1,
                      label_smoothing: float = 0.0, gamma: float = 0.5, lam: float = 0.1
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and the implicit rewards of chosen and rejected.

    On per-pair sequence log-probabilities (``logp = Σ log π(y_t | x, y_<t)`` over the completion tokens only;
    ``avg = logp / |y|``), ``β = beta``:

        sigmoid  (DPO, Rafailov et al. 2023)  z = β[(logp_c − ref_c) − (logp_r − ref_r)]
                 loss = −(1 − ε) log σ(z) − ε log σ(−z)            ε = label_smoothing (cDPO)
        ipo      (Azar et al. 2023, length-normalised as TRL)
                 loss = ((logp_c − ref_c)/|y_c| − (logp_r − ref_r)/|y_r| − 1/(2β))²
        simpo    (Meng et al. 2024, reference-free)   loss = −log σ(β·avg_c − β·avg_r − γ)
        orpo     (Hong et al. 2024, reference-free)
                 loss = −avg_c + λ · (−log σ(log odds_c − log odds_r)),  odds = p/(1−p), p = exp(avg)

    Rewards: ``β (logp − ref)`` (sigmoid, ipo), ``β·avg`` (simpo), ``λ·avg`` (orpo)."""
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
# Online RL with verifiable rewards (``finetune.mode: grpo``)
# ================================================================================================
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo")


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-relative advantages of rewards (N·G,) laid out group after group (G = ``num_generations``
    completions of one prompt in a row): ``A = r − mean(group)``, divided by ``std(group) + 1e-4`` (the
    unbiased std, as TRL) when ``scale_rewards`` (GRPO; Dr. GRPO turns it off). Returns (advantages, the
    std of each completion's group)."""
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {num_generations}")
    grouped = rewards.double().view(-1, num_generations)
    mean = grouped.mean(1).repeat_interleave(num_generations)
    std = (grouped.std(1) if num_generations > 1 else torch.zeros(grouped.size(0), dtype=torch.float64))
    std = std.repeat_interleave(num_generations)
    adv = rewards.double() - mean
    if scale_rewards:
        adv = adv / (std + 1e-4)
    return adv.to(rewards.dtype if rewards.is_floating_point() else torch.float32), std


def completion_logps(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs (B, T) of ``targets`` (shifted: the token after each position; IGNORE_INDEX where
    there is none) under ``logits / temperature`` (the sampling distribution, as TRL scores it); 0 where
    ignored."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked * (targets != IGNORE_INDEX)


def grpo_token_losses(logps: torch.Tensor, advantages: torch.Tensor, *, old_logps: torch.Tensor | None = None,
                      ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon: float = 0.2,
                      epsilon_high: float | None = None, use_bias_correction_kl: bool = True
                      ) -> dict[str, torch.Tensor]:
    """Per-token GRPO loss (B, T) with its parts.

        ratio  = exp(logp − old)              old = logp.detach() when None (one iteration: exactly 1)
        loss_t = −min(ratio·A, clip(ratio, 1 − ε, 1 + ε_high)·A) + β·KL_t
        KL_t   = exp(ref − logp) − (ref − logp) − 1     (the k3 estimator; only when β ≠ 0)
        KL_t  ×= ratio                         with ``use_bias_correction_kl`` (TRL's default: the unbiased
                                               reverse-KL gradient of DeepSeek-V3.2; the value is unchanged
                                               on-policy, the gradient is not)

    Returns ``loss`` (B, T), ``ratio``, ``kl`` (None without a reference) and ``clipped`` (bool, the tokens
    whose ratio left the clip region on the side the advantage pushes)."""
    eps_high = epsilon if epsilon_high is None else epsilon_high
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)
    loss = -torch.min(ratio * adv, clipped_ratio * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("grpo.beta != 0 needs reference log-probs")
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        if use_bias_correction_kl:
            kl = kl * ratio
        loss = loss + beta * kl
    clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
    return {"loss": loss, "ratio": ratio, "kl": kl, "clipped": clipped}


def grpo_reduce(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str, max_completion_length: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, n)`` of per-token losses, for the Trainer's Σ loss / Σ n over a step:

        grpo     Σ_rows (Σ_t loss / |y_row|)   n = rows             -> the mean over completions of their
                                                                       token mean (the GRPO paper)
        bnpo     Σ_rows Σ_t loss               n = completion tokens -> the mean over every token of the step
        dr_grpo  Σ_rows Σ_t loss               n = rows × max_completion_length (Dr. GRPO: a constant)

    TRL normalises each micro-batch and averages micro-batches; with one micro-batch per step (or equal
    token counts per micro-batch, for bnpo) the two are the same number."""
    mask = mask.to(token_loss.dtype)
    per_row = (token_loss * mask).sum(-1)
    if loss_type == "grpo":
        return (per_row / mask.sum(-1).clamp(min=1.0)).sum(), torch.tensor(float(mask.size(0)))
    if loss_type == "bnpo":
        return per_row.sum(), mask.sum().detach()
    if loss_type == "dr_grpo":
        return per_row.sum(), torch.tensor(float(mask.size(0) * max_completion_length))
    raise ValueError(f"grpo.loss_type={loss_type} is not one of {', '.join(GRPO_LOSS_TYPES)}")


class GRPOLoss:
    """``loss_fn(model, batch) -> (loss_sum, n)`` for the Trainer on a rollout batch: ``tokens`` (B, T)
    prompt + completion (right-padded), ``targets`` (B, T) the shifted completion tokens (IGNORE_INDEX on
    the prompt and padding), ``advantages`` (B,), and optionally ``old_logps`` / ``ref_logps`` (B, T).

    It keeps running sums of the masked KL and of the clipped tokens (``stats``; `take_stats` reads and
    resets them) for the metrics ``kl`` and ``clip_ratio``."""

    def __init__(self, loss_type: str = "grpo", *, beta: float = 0.0, epsilon: float = 0.2,
                 epsilon_high: float | None = None, temperature: float = 1.0, max_completion_length: int = 256,
                 use_bias_correction_kl: bool = True):
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"grpo.loss_type={loss_type} is not one of {', '.join(GRPO_LOSS_TYPES)}")
        self.loss_type, self.beta, self.epsilon, self.epsilon_high = loss_type, beta, epsilon, epsilon_high
        self.temperature, self.max_completion_length = temperature, max_completion_length
        self.use_bias_correction_kl = use_bias_correction_kl
        self.stats = torch.zeros(3, dtype=torch.float64)  # Σ kl, Σ clipped, Σ tokens

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        targets = batch["targets"]
        mask = targets != IGNORE_INDEX
        logps = completion_logps(model(batch["tokens"]), targets, self.temperature)
        parts = grpo_token_losses(logps, batch["advantages"], old_logps=batch.get("old_logps"),
                                  ref_logps=batch.get("ref_logps"), beta=self.beta, epsilon=self.epsilon,
                                  epsilon_high=self.epsilon_high,
                                  use_bias_correction_kl=self.use_bias_correction_kl)
        with torch.no_grad():
            m = mask.double()
            kl = (parts["kl"].double() * m).sum() if parts["kl"] is not None else m.new_zeros(())
            self.stats += torch.stack([kl, (parts["clipped"].double() * m).sum(), m.sum()]).cpu()
        return grpo_reduce(parts["loss"], mask, self.loss_type, self.max_completion_length)

    def take_stats(self) -> dict[str, float]:
        """``kl`` and ``clip_ratio`` (token means) since the last call; resets the sums."""
        kl, clipped, n = self.stats.tolist()
        self.stats.zero_()
        n = max(n, 1.0)
        return {"kl": kl / n, "clip_ratio": clipped / n}


# ================================================================================================
# The chunked LM-head loss (see the module docstring)
# ================================================================================================


def lm_head_loss(h: torch.Tensor, head: nn.Module, targets: torch.Tensor, *, chunk: int = 1024,
                 softcap: float | None = None, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss_sum, z_sum)`` over the targets != -100: loss_sum = Σ CE + Σ z_loss·lse² (the objective,
    differentiable), z_sum = the z-loss part alone (detached; Σ CE = loss_sum − z_sum).

    ``chunk`` tokens per piece (0 = the whole batch at once, the reference path)."""
    x = h.reshape(-1, h.size(-1))  # (N, dim)
    y = targets.reshape(-1)  # (N,)
    path = head_path(head) if chunk else "unchunked"
    if path == "unchunked":  # (under sequence parallel h is this rank's slice; the head returns every position)
        logits = head(h)  # (B, T, V)
        ce, z = loss_terms(logits.reshape(-1, logits.size(-1)), y, softcap, z_loss)
        return ce + z, z.detach()
    if path == "fused" and torch.is_grad_enabled() and (x.requires_grad or head.weight.requires_grad):
        return _FusedLinearCE.apply(x, head.weight, y, chunk, softcap, z_loss)
    if path == "fused":  # no gradient wanted (evaluation): the forward chunks only
        def piece(xc, yc):
            return torch.stack(loss_terms(F.linear(xc, head.weight), yc, softcap, z_loss))
    else:
        def piece(xc, yc):
            return torch.stack(loss_terms(head(xc), yc, softcap, z_loss))
    run = piece
    if torch.is_grad_enabled():  # keep each chunk's input only; its logits are recomputed in backward
        def run(xc, yc):
            return checkpoint(piece, xc, yc, use_reentrant=False)
    total = None
    for i in range(0, x.size(0), chunk):
        part = run(x[i:i + chunk], y[i:i + chunk])  # (2,): Σ CE, Σ z of the chunk
        total = part if total is None else total + part
    return total[0] + total[1], total[1].detach()


def head_path(head: nn.Module) -> str:
    """``fused`` | ``checkpointed`` | ``unchunked`` for this head module (see the module docstring)."""
    weight = getattr(head, "weight", None)
    if weight is not None and _is_dtensor(weight):
        return "unchunked"
    if (type(head) is nn.Linear and head.bias is None and not head._forward_hooks
            and not head._forward_pre_hooks):
        return "fused"
    return "checkpointed"


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed
        return False
    return isinstance(t, DTensor)


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = logits.float()
    return softcap * torch.tanh(logits / softcap) if softcap else logits


def loss_terms(logits: torch.Tensor, y: torch.Tensor, softcap: float | None,
                z_loss: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ CE, Σ z_loss · lse²) of logits (n, V) against y (n,) — the reference math, autograd through it."""
    s = _capped(logits, softcap)
    ce = F.cross_entropy(s, y, reduction="sum", ignore_index=IGNORE)
    if not z_loss:
        return ce, ce.new_zeros(())
    lse = torch.logsumexp(s, dim=-1)  # (n,)
    return ce, z_loss * (lse.square() * (y != IGNORE)).sum()


class _FusedLinearCE(torch.autograd.Function):
    """(Σ CE + Σ z-loss, Σ z-loss) of ``softcap(x Wᵀ)``, chunk by chunk, with d/dx and d/dW computed in
    forward; the second output is a report (no gradient flows through it)."""

    @staticmethod
    def forward(ctx, x, weight, y, chunk, softcap, z_loss):
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(dev, enabled=False):
            xs, w = x.to(dtype), weight.to(dtype)
            grad_x = torch.empty_like(x) if need_x else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            ce_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            z_sum = torch.zeros((), dtype=torch.float32, device=x.device)
            for i in range(0, x.size(0), chunk):
                xc, yc = xs[i:i + chunk], y[i:i + chunk]  # (n, dim), (n,)
                g, ce, z = _chunk_forward_backward(xc @ w.t(), yc, softcap, z_loss)  # g = d loss / d logits
                ce_sum += ce
                z_sum += z
                if need_x:
                    grad_x[i:i + chunk] = g.to(dtype) @ w  # (n, dim)
                if need_w:  # (V, dim), accumulated in fp32
                    if dtype == torch.float32:
                        grad_w.addmm_(g.t(), xc)
                    else:
                        grad_w += g.to(dtype).t() @ xc
        ctx.save_for_backward(grad_x, None if grad_w is None else grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(z_sum)
        return ce_sum + z_sum, z_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        grad_x, grad_w = ctx.saved_tensors  # d(Σ CE + Σ z)/dx and /dW, scaled by the incoming gradient
        out_x = None if grad_x is None else grad_x * grad_loss.to(grad_x.dtype)
        out_w = None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype)
        return out_x, out_w, None, None, None, None


@torch.no_grad()
def _chunk_forward_backward(logits: torch.Tensor, y: torch.Tensor, softcap: float | None,
                            z_loss: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d(Σ CE + Σ z)/d logits (n, V) fp32, Σ CE, Σ z) for one chunk, written out.

    With s = cap·tanh(logits/cap) (or s = logits) and lse = logsumexp(s):
      CE = lse − s[y],  z = coef·lse²,  d/ds = softmax(s)·(1 + 2·coef·lse) − onehot(y),
      d/d logits = d/ds · (1 − tanh²)   (the cap's derivative),   rows with y = -100 contribute nothing.
    """
    raw = logits.float()
    t = torch.tanh(raw / softcap) if softcap else None
    s = softcap * t if softcap else raw  # (n, V)
    valid = y != IGNORE  # (n,)
    yc = torch.where(valid, y, 0)
    target_s = s.gather(1, yc[:, None]).squeeze(1)  # (n,)
    peak = s.amax(dim=-1)  # (n,)
    g = s.sub_(peak[:, None]).exp_()  # exp(s - max), in place of s: (n, V); no other (n, V) buffer
    sumexp = g.sum(dim=-1)  # (n,)
    lse = peak + sumexp.log()  # logsumexp(s): (n,)
    ce = ((lse - target_s) * valid).sum()
    z = (z_loss * lse.square() * valid).sum() if z_loss else lse.new_zeros(())
    row = valid.to(g.dtype) / sumexp  # softmax = exp(s - max) / Σ; rows without a target get 0
    if z_loss:
        row = row * (1.0 + 2.0 * z_loss * lse)
    g.mul_(row[:, None])
    g.scatter_add_(1, yc[:, None], -valid.to(g.dtype)[:, None])
    if softcap:
        g.mul_(1.0 - t.square())
    return g, ce, z


_DEFAULT = CausalLMLoss()
