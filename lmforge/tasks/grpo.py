"""Online RL with verifiable rewards (``finetune.mode: grpo``): GRPO / Dr. GRPO on lmforge's own generation
and the shared Trainer (full fine-tuning, or LoRA with ``grpo.lora: true``).

One optimizer step:

1. rollouts (`RolloutBatches.next_batch`, every ``grpo.num_iterations`` steps): the next
   ``train.global_batch / grpo.num_generations`` prompts of a seeded per-epoch order; G completions each,
   sampled from the current policy with ``grpo.temperature`` / ``grpo.top_p`` by
   `lmforge.generate.engine.generate_ids`, one request per completion with its own seed derived from
   (train.seed, step, prompt index, completion index) — a rollout does not depend on batching or on
   the number of ranks;
2. rewards (`lmforge.tasks.grpo_rewards`: the weighted ``grpo.rewards``, default the answer check) and
   group-relative advantages (`lmforge.train.losses.group_advantages`);
3. with ``num_iterations`` > 1 the old log-probs (the policy at rollout time), with ``beta`` > 0 the
   reference log-probs (a frozen copy of the starting model, or the LoRA base with adapters off, as DPO);
4. the clipped policy-gradient loss (`lmforge.train.losses.GRPOLoss`, TRL's grpo / bnpo / dr_grpo), on
   micro-batches of ``train.micro_batch`` completions.

One process for now: a multi-process launch is refused (generation from sharded weights would need every
rank in step through each forward). The rollouts of a step are held in the batch source's state: a checkpoint taken between the iterations of
one batch of rollouts resumes with them (exact resume); the data cursor and step count are in the same state.

Metrics (TRL's names) join every train row of metrics.jsonl: ``reward``, ``reward_std``,
``rewards/<fn>/mean``, ``rewards/<fn>/std``, ``completions/mean_length``, ``completions/clipped_ratio``
(completions cut at max_completion_length), ``frac_reward_zero_std`` (groups with no signal), ``kl``,
``clip_ratio/region_mean``. Each evaluation scores up to ``grpo.eval_max_prompts`` dev prompts with one greedy
completion each: ``reward`` and ``rewards/<fn>/mean`` (eval.metric defaults to ``reward``). The rollouts
that train every ``grpo.sample_interval``-th step (prompts, completions, rewards, advantages) go to
``RUN/completions/step_NNNNNN.jsonl``, named by the first step they train.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.atomic import atomic_write_text
from lmforge.config import ConfigError, UserError
from lmforge.console import info
from lmforge.data.prompts import encode_prompts, load_prompts
from lmforge.distributed.world import unwrap
from lmforge.generate.engine import GenerationConfig, generate_ids
from lmforge.models.lora import LoRALinear
from lmforge.tasks.base import RunResult
from lmforge.tasks.config import RewardSpec
from lmforge.tasks.finetuning import FinetuneTask, check_ids, pad_id, read_train_dev
from lmforge.tasks.grpo_rewards import build_rewards, score
from lmforge.tasks.preference import adapters_disabled, frozen_copy
from lmforge.tokenizer.chat_template import get_chat_template, save_chat_template
from lmforge.train.losses import IGNORE, GRPOLoss, completion_logps, group_advantages

SAMPLES_DIR = "completions"


def rollout_seed(seed: int, step: int, prompt: int, index: int) -> int:
    """The sampling seed of completion ``index`` of prompt ``prompt`` (its index in the train set) at ``step``."""
    digest = hashlib.blake2b(f"lmforge-grpo/{seed}/{step}/{prompt}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextlib.contextmanager
def eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def rollout_tensors(prompts: list[list[int]], completions: list[list[int]], pad: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows prompt + completion, right-padded -> (tokens (B, T), targets (B, T)): ``targets[b, t]`` is the
    completion token after position t, IGNORE on the prompt and the padding."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    tokens = torch.full((len(prompts), T), pad, dtype=torch.long)
    targets = torch.full((len(prompts), T), IGNORE, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        row = p + c
        tokens[i, :len(row)] = torch.tensor(row)
        if c:
            targets[i, len(p) - 1:len(row) - 1] = torch.tensor(c)
    return tokens, targets


@torch.no_grad()
def batched_logps(model, tokens: torch.Tensor, targets: torch.Tensor, temperature: float, micro: int
                  ) -> torch.Tensor:
    """Per-token log-probs of the targets under ``model`` (eval mode), ``micro`` rows at a time."""
    device = next(model.parameters()).device
    parts = []
    with eval_mode(model):
        for s in range(0, tokens.size(0), micro):
            t = tokens[s:s + micro].to(device)
            parts.append(completion_logps(model(t), targets[s:s + micro].to(device), temperature).cpu())
    return torch.cat(parts)


class RolloutBatches:
    """The Trainer's batch source for GRPO: samples, scores and packs rollouts (see the module docstring).
    ``state_dict()`` holds the data cursor, the step and the rollouts still to be reused."""

    def __init__(self, task: GRPOTask, model: nn.Module, ref_model: nn.Module | None, device):
        cfg = task.cfg
        self.task, self.model, self.ref_model, self.device = task, model, ref_model, device
        self.g = cfg.grpo
        self.seed = cfg.train.seed
        self.n_prompts = cfg.global_batch_size // self.g.num_generations
        self.rank, self.world_size = task.world.dp_rank, task.world.dp_size
        if self.n_prompts % self.world_size:
            raise ConfigError(f"train.global_batch / grpo.num_generations = {self.n_prompts} prompts per step must "
                              f"be a multiple of the {self.world_size} data-parallel ranks")
        self.epoch, self.pos, self.step = 0, 0, 0
        self.buffer: dict[str, Any] | None = None  # the current rollouts (JSON-safe lists)
        self.window: list[dict[str, float]] = []  # per-step rollout metrics since the last train row
        self.last_rollout: dict[str, float] | None = None  # the metrics of the rollouts in ``buffer``

    # ---- the data order ----
    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.task.train_ids)))
        random.Random(f"lmforge-grpo-order/{self.seed}/{epoch}").shuffle(order)
        return order

    def _next_prompts(self) -> list[int]:
        out = []
        while len(out) < self.n_prompts:
            order = self._order(self.epoch)
            take = min(self.n_prompts - len(out), len(order) - self.pos)
            out += order[self.pos:self.pos + take]
            self.pos += take
            if self.pos >= len(order):
                self.epoch, self.pos = self.epoch + 1, 0
        return out[self.rank::self.world_size]  # this rank's groups

    # ---- one batch of rollouts ----
    def rollout(self) -> dict[str, Any]:
        task, g = self.task, self.g
        base = unwrap(self.model)
        idx = self._next_prompts()
        eos = getattr(task.tokenizer, "eos_id", None)
        prompts, completions, texts, truncated = [], [], [], []
        with eval_mode(base):
            for p in idx:
                ids = task.train_ids[p]
                for k in range(g.num_generations):
                    gen = GenerationConfig(max_new_tokens=g.max_completion_length, temperature=g.temperature,
                                           top_p=g.top_p if g.top_p < 1.0 else None,
                                           seed=rollout_seed(self.seed, self.step, p, k), eos_id=eos)
                    out = generate_ids(base, [ids], gen)[0]
                    cut = len(out) >= g.max_completion_length
                    prompts.append(ids)
                    completions.append(out if cut or eos is None else out + [eos])  # the model learns to stop
                    texts.append(task.tokenizer.decode(out))
                    truncated.append(cut)
        examples = [task.train[p] for p in idx for _ in range(g.num_generations)]
        total, per = score(task.rewards, [e.text() for e in examples], texts, [e.answer for e in examples],
                           completions)
        rewards = torch.tensor(total, dtype=torch.float64)
        adv, std = group_advantages(rewards, g.num_generations, g.scale_rewards)
        self._record(rewards, std, per, completions, truncated)
        n, mu = g.sample_interval, g.num_iterations  # these rollouts train steps step+1 … step+mu
        if n and (self.step + mu) // n > self.step // n and task.world.is_main:
            self._write_samples(examples, texts, total, per, adv)
        buf = {"prompts": prompts, "completions": completions, "advantages": adv.float().tolist()}
        tokens, targets = rollout_tensors(prompts, completions, task.pad)
        micro = task.cfg.train.micro_batch
        if g.num_iterations > 1:  # the policy that sampled them, for the importance ratio of later iterations
            buf["old_logps"] = batched_logps(base, tokens, targets, g.temperature, micro).tolist()
        if g.beta != 0.0:
            if self.ref_model is not None:
                buf["ref_logps"] = batched_logps(self.ref_model, tokens, targets, g.temperature, micro).tolist()
            else:
                with adapters_disabled(base):
                    buf["ref_logps"] = batched_logps(base, tokens, targets, g.temperature, micro).tolist()
        return buf

    def _record(self, rewards, std, per, completions, truncated) -> None:
        G = self.g.num_generations
        m: dict[str, float] = {"reward": float(rewards.mean()),
                               "reward_std": float(rewards.std()) if rewards.numel() > 1 else 0.0,
                               "frac_reward_zero_std": float((std.view(-1, G)[:, 0] == 0).double().mean()),
                               "completions/mean_length": sum(map(len, completions)) / len(completions),
                               "completions/clipped_ratio": sum(truncated) / len(truncated)}
        for name, values in per.items():
            vals = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
            if vals.numel():
                m[f"rewards/{name}/mean"] = float(vals.mean())
                m[f"rewards/{name}/std"] = float(vals.std()) if vals.numel() > 1 else 0.0
        self.window.append(m)
        self.last_rollout = m

    def _write_samples(self, examples, texts, total, per, adv) -> None:
        out = Path(self.task.run_dir) / SAMPLES_DIR / f"step_{self.step + 1:06d}.jsonl"
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = [json.dumps({"step": self.step + 1, "prompt": e.text(), "answer": e.answer, "completion": t,
                            "reward": r, "rewards": {k: v[i] for k, v in per.items()}, "advantage": float(a)})
                for i, (e, t, r, a) in enumerate(zip(examples, texts, total, adv.tolist()))]
        atomic_write_text(out, "\n".join(rows) + "\n")

    # ---- the Trainer's interface ----
    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.step % self.g.num_iterations == 0 or self.buffer is None:
            self.buffer = self.rollout()
        elif self.last_rollout is not None:
            self.window.append(dict(self.last_rollout))  # a reused batch: the same rollout metrics
        buf = self.buffer
        tokens, targets = rollout_tensors(buf["prompts"], buf["completions"], self.task.pad)
        lengths = [len(p) + len(c) for p, c in zip(buf["prompts"], buf["completions"])]
        batch = {"tokens": tokens, "targets": targets, "advantages": torch.tensor(buf["advantages"]),
                 "input_tokens": torch.tensor(lengths)}  # real tokens per row: the throughput count
        T = tokens.size(1)
        for key in ("old_logps", "ref_logps"):
            if key in buf:
                batch[key] = torch.tensor(buf[key])[:, :T]
        self.step += 1
        if self.step % self.g.num_iterations == 0:
            self.buffer = None  # used up: the next step samples afresh
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "pos": self.pos, "step": self.step, "buffer": self.buffer,
                "buffer_metrics": self.last_rollout if self.buffer is not None else None,
                "n_prompts": self.n_prompts, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("n_prompts") != self.n_prompts or state.get("world_size") != self.world_size:
            raise ConfigError("the checkpoint's GRPO rollouts were made with another train.global_batch / "
                              "grpo.num_generations or number of ranks; resume with the same ones")
        self.epoch, self.pos, self.step = int(state["epoch"]), int(state["pos"]), int(state["step"])
        self.buffer = state.get("buffer")
        self.last_rollout = state.get("buffer_metrics")

    def take_metrics(self, loss: GRPOLoss) -> dict[str, float]:
        """The mean of the rollout metrics of the steps since the last call, and the loss's KL / clip ratio."""
        out: dict[str, float] = {}
        if self.window:
            keys = dict.fromkeys(k for m in self.window for k in m)
            for k in keys:
                vals = [m[k] for m in self.window if k in m]
                out[k] = sum(vals) / len(vals)
            self.window = []
        stats = loss.take_stats()
        if self.g.beta != 0.0:
            out["kl"] = stats["kl"]
        out["clip_ratio/region_mean"] = stats["clip_ratio"]
        return out


class GRPOEvaluator:
    """``eval_fn``: one greedy completion per dev prompt (at most ``grpo.eval_max_prompts``), scored with the
    run's rewards; every rank computes the same numbers."""

    def __init__(self, task: GRPOTask):
        self.task = task
        n = task.cfg.grpo.eval_max_prompts
        self.examples, self.ids = task.dev[:n], task.dev_ids[:n]

    @torch.no_grad()
    def __call__(self, model) -> dict[str, float]:
        task, g = self.task, self.task.cfg.grpo
        base = unwrap(model)
        eos = getattr(task.tokenizer, "eos_id", None)
        gen = GenerationConfig(max_new_tokens=g.max_completion_length, temperature=0.0, eos_id=eos)
        outs = []
        with eval_mode(base):
            for ids in self.ids:  # one request each: the greedy answer does not depend on padding
                outs.append(generate_ids(base, [ids], gen)[0])
        texts = [task.tokenizer.decode(o) for o in outs]
        total, per = score(task.rewards, [e.text() for e in self.examples], texts,
                           [e.answer for e in self.examples], outs)
        res = {"reward": sum(total) / max(1, len(total))}
        for name, values in per.items():
            vals = [v for v in values if v is not None]
            if vals:
                res[f"rewards/{name}/mean"] = sum(vals) / len(vals)
        return res


class GRPOTask(FinetuneTask):
    """``finetune.mode: grpo`` (see the module docstring)."""

    name = "grpo"
    unit = "tokens"

    def what(self) -> str:
        return "GRPO with LoRA" if self.uses_lora() else "GRPO (full fine-tuning)"

    def unit_text(self) -> str:
        return f"completions ({self.cfg.grpo.num_generations} per prompt)"

    # ---- data ----
    def check(self) -> None:
        super().check()
        g = self.cfg.grpo
        self.rewards = build_rewards(list(g.rewards) or [RewardSpec(name="answer")], g.max_completion_length)
        if self.cfg.data.seq_len <= g.max_completion_length:
            raise ConfigError(f"data.seq_len={self.cfg.data.seq_len} must exceed grpo.max_completion_length="
                              f"{g.max_completion_length}: a prompt gets seq_len - max_completion_length tokens")

    def read_data(self, world, device) -> None:
        cfg, d = self.cfg, self.cfg.data
        if world.world_size > 1:  # sharded generation needs every rank in step through each forward: not yet
            raise UserError(f"finetune.mode=grpo runs in one process for now ({world.world_size} were started); "
                            "launch it without torchrun")
        template = get_chat_template(self.tokenizer, d.chat_template)
        self.train, self.dev = read_train_dev(lambda paths, cap: load_prompts(paths, d.columns, cap), d,
                                              cfg.train.seed)
        max_prompt = d.seq_len - cfg.grpo.max_completion_length
        self.train_ids, cut = encode_prompts(self.tokenizer, self.train, template, max_prompt)
        check_ids(self.train_ids, self.mcfg.vocab_size, "data.train")
        self.dev_ids, dev_cut = encode_prompts(self.tokenizer, self.dev, template, max_prompt)
        check_ids(self.dev_ids, self.mcfg.vocab_size, "data.dev")
        self.template, self.pad = template, pad_id(self.tokenizer)
        self.stats = {"train": {"prompts": len(self.train), "cut": cut}, "dev": {"prompts": len(self.dev),
                                                                              "cut": dev_cut}}
        self.units_per_epoch = len(self.train) * cfg.grpo.num_generations  # completions (train.global_batch)
        self.n_train, self.n_dev = len(self.train), len(self.dev)
        if cut and world.is_main:
            info(f"note: {cut} train prompts were longer than data.seq_len - grpo.max_completion_length = "
                 f"{max_prompt} tokens; their last {max_prompt} tokens are kept")
        if self.dev and cfg.eval.batches and cfg.grpo.eval_max_prompts:
            self._eval = GRPOEvaluator(self)

    def task_fields(self) -> dict[str, Any]:
        g = self.cfg.grpo
        return {**self.chat_fields(), "grpo.num_generations": g.num_generations,
                "grpo.max_completion_length": g.max_completion_length, "grpo.temperature": g.temperature,
                "grpo.top_p": g.top_p, "grpo.beta": g.beta, "grpo.epsilon": g.epsilon,
                "grpo.epsilon_high": g.epsilon_high, "grpo.num_iterations": g.num_iterations,
                "grpo.loss_type": g.loss_type, "grpo.scale_rewards": g.scale_rewards,
                "grpo.use_bias_correction_kl": g.use_bias_correction_kl,
                "grpo.rewards": [[r.name, r.weight] for r in self.rewards]}

    # ---- model, rollouts and loss ----
    def loss(self, model):
        g = self.cfg.grpo
        self.loss_fn = GRPOLoss(g.loss_type, beta=g.beta, epsilon=g.epsilon, epsilon_high=g.epsilon_high,
                                temperature=g.temperature, max_completion_length=g.max_completion_length,
                                use_bias_correction_kl=g.use_bias_correction_kl)
        ref = None
        if g.beta != 0.0 and not any(isinstance(m, LoRALinear) for m in model.modules()):
            ref = frozen_copy(unwrap(model))  # the starting weights (a resumed run loads later: still these)
        self.batches = RolloutBatches(self, model, ref, self.device)
        return self.loss_fn

    def job(self, model, world, device, total_steps):
        job = super().job(model, world, device, total_steps)
        job.step_metrics = lambda: self.batches.take_metrics(self.loss_fn)
        return job

    # ---- the end ----
    def save_dir(self, model, out: Path, weights_step: int) -> None:
        self.save_lm_dir(model, out, weights_step)
        if self.template is not None and self.cfg.data.chat_template is not None:
            save_chat_template(self.template, out)

    @classmethod
    def metrics_text(cls, val: dict[str, float], res: RunResult) -> list[str]:
        return [f"dev reward {val['reward']:.4f}"] if "reward" in val else []


__all__ = ["GRPOEvaluator", "GRPOTask", "RolloutBatches", "rollout_seed", "rollout_tensors"]
