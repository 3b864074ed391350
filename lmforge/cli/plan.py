"""`lmforge plan`: will this training plan fit, and how long will it take? (No model is built.)"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError, UserError, load_config_source, recipe_name
from lmforge.console import emit

HELP = ("per-GPU memory, fits verdict, FLOPs and time for training (pretrain, full, LoRA, QLoRA, DPO, reward) "
        "or inference on N GPUs (--suggest searches; --calibration shows the published checks)")

_SUFFIX = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def token_count(text: str) -> float:
    """'2e12', '2T', '300B', '1.5t' -> a token count."""
    s = str(text).strip().lower().replace("_", "").replace(",", "")
    mult = _SUFFIX.get(s[-1:], None)
    try:
        return float(s[:-1]) * mult if mult else float(s)
    except ValueError:
        raise ConfigError(f"--tokens {text!r} is not a number; write e.g. 2e12 or 2T") from None


def add_arguments(p) -> None:
    from lmforge.planner.hardware import GPUS

    p.add_argument("--model", default=None,
                   help="preset name (see `lmforge model list`), a model dir / config.json, or a pretrain YAML recipe "
                        "(a file or a packaged name such as pretrain/llama2-7b)")
    p.add_argument("--mode", choices=["pretrain", "full", "lora", "qlora", "dpo", "reward", "infer"],
                   default="pretrain", help="what runs (default pretrain; full = full fine-tuning)")
    p.add_argument("--gpus", type=int, default=None, help="number of GPUs (default 1)")
    p.add_argument("--gpu", default="h100", help=f"GPU preset for memory and peak FLOP/s: {', '.join(GPUS)}")
    p.add_argument("--gpu-mem-gb", type=float, default=None, help="memory per GPU in GB (default: the preset's)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense peak TFLOP/s (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: model max_seq_len)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per GPU per forward (default 1)")
    p.add_argument("--dp-shard", type=int, default=None, help="FSDP2 shard degree (default: fill the rest)")
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (default 1)")
    p.add_argument("--dp-replicate", type=int, default=None, help="replicas (DDP / HSDP outer degree, default 1)")
    p.add_argument("--ac", default=None,
                   help="activation checkpointing, as parallel.activation_checkpoint names it: none, full, "
                        "selective (torchtitan's op SAC: every other matmul kept), matmuls (every matmul kept), "
                        "layer-N (every N-th block full)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="compute precision (default bf16)")
    p.add_argument("--optimizer", choices=["adamw", "adamw8bit", "muon"], default="adamw")
    p.add_argument("--lora-rank", type=int, default=8, help="LoRA rank (lora, qlora, dpo with adapters)")
    p.add_argument("--lora-targets", default="wq,wv", help="adapted projections: wq,wv | attention | mlp | all-linear")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    p.add_argument("--quant", choices=["none", "nf4", "nf4-dq"], default=None,
                   help="4-bit base (qlora: default nf4-dq, double quantization; infer: default none)")
    p.add_argument("--dpo-reference", choices=["model", "adapter", "precomputed"], default="model",
                   help="DPO reference: a frozen copy, the base under LoRA adapters, or precomputed log-probs")
    p.add_argument("--doc-mask", action="store_true", default=None,
                   help="packed documents masked apart (an explicit attention mask in every block)")
    p.add_argument("--tokens", type=token_count, default=None, help="training tokens for the time estimate (2e12, 2T)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilization (default 0.4)")
    p.add_argument("--suggest", action="store_true",
                   help="search micro batch, activation checkpointing, dp_shard and tp for the fastest plan that fits")
    p.add_argument("--calibration", action="store_true",
                   help="print published peak-memory measurements beside the planner's figures")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")


def _model_source(arg: str) -> tuple[Any, str, dict[str, Any]]:
    """(preset name or ModelConfig, display name, defaults taken from a recipe)."""
    path = Path(arg)
    if not path.exists() and recipe_name(arg) is None:  # a preset name
        return arg, arg, {}
    from lmforge.models.presets import model_config_from_dict

    if path.is_dir() or path.name == "config.json":
        from lmforge.artifacts.metadata import read_metadata

        directory = path if path.is_dir() else path.parent
        if not (directory / "config.json").is_file():
            raise ConfigError(f"--model {arg}: a model dir needs a config.json; pass a preset name or a model dir")
        try:
            info = read_metadata(directory)
        except UserError as e:
            raise ConfigError(f"--model {arg}: {e}") from None
        return model_config_from_dict(info.model), arg, {}
    if path.suffix == ".json":
        from lmforge.config import read_json_bounded

        try:
            data = read_json_bounded(path, what="model config")
        except UserError as e:
            raise ConfigError(f"--model {arg}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"--model {arg}: {path} is not a JSON object; pass a model dir or a preset name")
        return model_config_from_dict(data.get("model", data)), arg, {}
    recipe = load_config_source(arg)  # a YAML file or a packaged recipe (pretrain/llama2-7b)
    if not isinstance(recipe.get("model"), dict):
        raise ConfigError(f"--model {arg}: the YAML has no 'model:' section; pass a pretrain recipe or a preset")
    defaults: dict[str, Any] = {}
    data, train, par = recipe.get("data") or {}, recipe.get("train") or {}, recipe.get("parallel") or {}
    if data.get("seq_len"):
        defaults["seq_len"] = int(data["seq_len"])
    if data.get("doc_mask") is not None:
        defaults["doc_mask"] = bool(data["doc_mask"])
    if train.get("micro_batch"):
        defaults["micro_batch"] = int(train["micro_batch"])
    if train.get("precision") in ("bf16", "fp32"):
        defaults["precision"] = train["precision"]
    for key, name in (("tp", "tp"), ("dp_replicate", "dp_replicate"), ("dp_shard", "dp_shard"),
                      ("activation_checkpoint", "ac")):
        if par.get(key) is not None:
            defaults[name] = par[key]
    model = recipe["model"]
    display = model.get("preset", path.stem) if isinstance(model, dict) else path.stem
    return model_config_from_dict(model), display, defaults


def _request(args):
    from lmforge.planner.estimate import PlanRequest

    model, display, defaults = _model_source(args.model)
    given = {k: getattr(args, k) for k in ("gpus", "seq_len", "micro_batch", "dp_shard", "tp", "dp_replicate",
                                           "ac", "precision", "doc_mask") if getattr(args, k) is not None}
    values = {"gpus": 1, "micro_batch": 1, "dp_shard": -1, "tp": 1, "dp_replicate": 1, "ac": "none",
              "precision": "bf16", "doc_mask": False, **defaults, **given}
    return PlanRequest(model=model, model_name=display, gpu=args.gpu, gpu_mem_gb=args.gpu_mem_gb,
                       peak_tflops=args.peak_tflops, optimizer=args.optimizer, tokens=args.tokens, mfu=args.mfu,
                       mode=args.mode, lora_rank=args.lora_rank, lora_targets=args.lora_targets,
                       lora_dropout=args.lora_dropout, quant=args.quant, dpo_reference=args.dpo_reference, **values)


def _hours(h: float) -> str:
    return f"{h:,.1f} h" if h < 48 else f"{h / 24:,.1f} days"


def summary(plan: dict[str, Any]) -> str:
    m, par = plan["memory_gb"], plan["parallel"]
    verdict = "fits" if plan["fits"] else "does NOT fit"
    peak = plan["memory_peak_gb"]
    layout = f"dp_replicate={par['dp_replicate']} dp_shard={par['dp_shard']} tp={par['tp']} ({par['wrapper']})"
    what = plan["mode"] + (f" r={plan['lora']['rank']}" if plan.get("lora") else "")
    what += f" {plan['quant']}" if plan["quant"] != "none" else ""
    line = (f"{plan['model']} ({plan['params'] / 1e9:.2f}B params) {what} on {plan['gpus']}x {plan['gpu']}, "
            f"{layout}, seq {plan['seq_len']} x micro batch {plan['micro_batch']}, ac={plan['ac']}, "
            f"{plan['precision']}, {plan['optimizer'] or 'no optimizer'}: weights {m['weights']:.1f} + grads "
            f"{m['grads']:.1f} + optimizer {m['optimizer']:.1f} + activations {m['activations']:.1f} + buffers "
            f"{m['buffers']:.1f} = {m['total']:.1f} GB per GPU of {plan['gpu_mem_gb']:g} -> {verdict} "
            f"(allocated {peak['allocated']:.1f}, reserved {peak['reserved']:.1f}); "
            f"{plan['flops']['per_token'] / 1e9:.1f} GFLOP/token, {plan['tokens_per_s']:,.0f} tokens/s at "
            f"MFU {plan['mfu']['effective']:.2f}")
    if "hours" in plan:
        line += f"; {plan['tokens']:.3g} tokens in {_hours(plan['hours'])} ({plan['gpu_hours']:,.0f} GPU-hours)"
    else:
        line += (f"; Chinchilla {plan['chinchilla_tokens']:.3g} tokens in {_hours(plan['hours_chinchilla'])}")
    if plan.get("suggested") is False:
        line = "no plan fits; the smallest: " + line
    elif plan.get("suggested"):
        line = f"fastest of {plan['candidates_that_fit']} plans that fit: " + line
    return line


def mixture_plan(arg: str | None, tokens: float | None) -> dict[str, Any] | None:
    """Tokens (and epochs, where the shard dirs can be read) per ``data.sources`` source of a pretrain recipe,
    over ``tokens`` (default: the recipe's train.max_tokens, or max_steps × global batch × seq_len)."""
    if not arg or (Path(arg).suffix not in (".yaml", ".yml") and recipe_name(arg) is None):
        return None
    try:
        recipe = load_config_source(arg)
    except (ConfigError, UserError):
        return None
    data = recipe.get("data") if isinstance(recipe, dict) else None
    if not isinstance(data, dict) or not data.get("sources"):
        return None
    from lmforge.config import from_dict
    from lmforge.data.mixture import MixPhaseSpec, MixSchedule, expected_tokens
    from lmforge.data.shards import read_index
    from lmforge.train.config import DataConfig, TrainConfig, validate_data_sources

    d = from_dict(DataConfig, data, prefix="data")
    validate_data_sources(d)
    t = from_dict(TrainConfig, recipe.get("train") or {}, prefix="train")
    batch = t.global_batch or (t.global_batch_tokens or 0) // d.seq_len
    if batch <= 0:
        raise ConfigError(f"{arg}: set train.global_batch (or train.global_batch_tokens) to plan data.sources")
    per_step = batch * d.seq_len
    budget = tokens or t.max_tokens or (t.max_steps or 0) * per_step
    if not budget:
        raise ConfigError("pass --tokens (e.g. 2T) or set train.max_tokens / train.max_steps to plan data.sources")
    steps = math.ceil(budget / per_step)
    names = [s.name for s in d.sources]
    windows, have = {}, {}
    for s in d.sources:
        try:
            n = int(read_index(s.dir)["splits"]["train"]["tokens"])
        except (UserError, KeyError, TypeError):
            continue  # not prepared yet (or unreachable): tokens only, no epochs
        have[s.name], windows[s.name] = n, max(1, (n - 1) // d.seq_len)
    sched = MixSchedule(names, [s.weight for s in d.sources],
                        [MixPhaseSpec(p.until_step, dict(p.weights), p.interpolate) for p in d.schedule])
    rows, last = expected_tokens(names, sched, steps, batch, d.seq_len, windows,
                                 {s.name: s.on_exhaust for s in d.sources})
    for s in d.sources:
        rows[s.name]["on_exhaust"] = s.on_exhaust
        if s.name in have:
            rows[s.name]["train_tokens"] = have[s.name]
    return {"tokens": steps * per_step, "steps": steps, "steps_with_data": last, "sources": rows}


def mixture_lines(mix: dict[str, Any]) -> str:
    out = [f"data.sources over {mix['tokens']:.3g} tokens ({mix['steps']:,} steps):"]
    for name, r in mix["sources"].items():
        epochs = f", {r['epochs']:.2f} epochs of its {r['train_tokens']:,} tokens" if "epochs" in r else \
            " (shard dir not readable here: no epochs)"
        stop = f"; stops at step {r['exhausted_at_step']:,}" if r.get("exhausted_at_step") is not None else ""
        out.append(f"  {name}: {r['tokens']:.3g} tokens ({r['share']:.1%}){epochs}{stop}")
    if mix["steps_with_data"] < mix["steps"]:
        out.append(f"  every source stops by step {mix['steps_with_data']:,}: the run ends there")
    return "\n".join(out)


def run(args) -> int:
    from lmforge.planner.estimate import estimate, suggest

    if args.calibration:
        from lmforge.planner.calibration import markdown, table

        rows = table()
        emit(args, markdown(rows), {"rows": rows})
        return 0
    if args.model is None:
        raise ConfigError("lmforge plan needs --model (a preset, a model dir or a recipe), or --calibration")
    req = _request(args)
    plan = suggest(req) if args.suggest else estimate(req)
    mix = mixture_plan(args.model, args.tokens)
    line = summary(plan)
    if mix is not None:
        plan["data_sources"] = mix
        line += "\n" + mixture_lines(mix)
    emit(args, line, plan)
    return 0
