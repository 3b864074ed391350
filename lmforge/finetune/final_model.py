"""The end of a fine-tuning run: the best evaluation's weights kept in RUN/best/ (``eval.keep_best``), and
RUN/model (best or last weights; LoRA merged; a classifier, reward or LM dir) plus RUN/adapter."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from lmforge.atomic import atomic_directory
from lmforge.console import info
from lmforge.finetune.config import FinetuneConfig
from lmforge.models.adapter_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS

BEST_DIR = "best"
BEST_WEIGHTS = "weights.safetensors"
BEST_META = "best.json"


def lora_trainable_prefixes(cfg: FinetuneConfig) -> tuple[str, ...]:
    return ("score.",) if cfg.mode in ("classify", "reward") else ()


def save_adapter(model, directory: Path, cfg: FinetuneConfig, base_fingerprint: str,
                 labels: Sequence[str] | None) -> Path:
    """RUN/adapter: the LoRA tensors (+ a classifier head) and a reference to the base model dir."""
    from lmforge.models.lora import lora_state_dict
    from lmforge.models.model_dir import save_weights

    sd = lora_state_dict(model)
    sd.update({k: v for k, v in model.state_dict().items() if k.startswith("score.")})
    meta = {"base_model": str(Path(cfg.model.path).resolve()), "base_fingerprint": base_fingerprint,
            "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets),
            "task": {"classify": "classify", "reward": "reward"}.get(cfg.mode, "lm"),
            "lmforge_version": __import__("lmforge").__version__}
    if cfg.mode == "classify":
        meta.update(labels=list(labels or []), pooling=cfg.classify.pooling)

    def write(tmp: Path) -> None:
        save_weights(sd, tmp, weights_name=ADAPTER_WEIGHTS)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, ensure_ascii=False))

    return _write_dir_atomic(directory, write)


def _write_dir_atomic(directory: Path, write) -> Path:
    """Build a dir in a temp sibling with ``write(tmp)``, then swap it into place."""
    with atomic_directory(directory) as tmp:
        write(tmp)
    return Path(directory)


def _gather(model, trainable_only: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=trainable_only))


def save_best(trainer, run_dir: Path) -> None:
    """on_best hook: keep the trainable weights of the best evaluation in RUN/best/ (all ranks call it)."""
    from lmforge.distributed.world import barrier
    from lmforge.models.model_dir import save_weights

    sd = _gather(trainer.model, trainable_only=True)
    seen: set = set()
    for k in list(sd):  # tied weights (embeddings = output) are stored once; tie_weights() restores them
        key = (sd[k].untyped_storage().data_ptr(), sd[k].storage_offset(), tuple(sd[k].shape))
        if key in seen:
            del sd[k]
        seen.add(key)
    if trainer.world.is_main:
        meta = {"step": trainer.step, "metric": trainer.best_metric, "value": trainer.best_val}

        def write(tmp: Path) -> None:
            save_weights(sd, tmp, weights_name=BEST_WEIGHTS)
            (tmp / BEST_META).write_text(json.dumps(meta, indent=1))

        _write_dir_atomic(run_dir / BEST_DIR, write)
    barrier()


def _export_shell(cfg: FinetuneConfig, base_cfg, labels):
    """The fine-tuned structure on the meta device (no memory): backbone [+ head] [+ LoRA]."""
    import torch

    from lmforge.models.classifier import SequenceClassifier
    from lmforge.models.lora import apply_lora
    from lmforge.models.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(base_cfg)
        if cfg.mode == "classify":
            model = SequenceClassifier(model, len(labels), cfg.classify.pooling)
        if cfg.mode == "reward":
            from lmforge.models.reward import RewardModel

            model = RewardModel(model)
    if cfg.uses_lora:
        apply_lora(model, cfg.lora_config(), trainable=lora_trainable_prefixes(cfg))
    return model


def _backbone(model):
    return getattr(model, "backbone", model)


def export(trainer, result, cfg: FinetuneConfig, base_cfg, labels, template: str | None,
           base_fingerprint: str) -> tuple[str | None, str | None, int | None]:
    """Write RUN/model (best or last weights; LoRA merged) and RUN/adapter. Returns
    (model dir, adapter dir, step whose weights RUN/model holds)."""
    from safetensors.torch import load_file

    from lmforge.distributed.world import barrier
    from lmforge.models.classifier import save_classifier_dir
    from lmforge.models.lora import merge_lora
    from lmforge.models.model_dir import save_model_dir
    from lmforge.tokenizer.chat_template import save_chat_template
    from lmforge.tokenizer.identity import tokenizer_dir_hash

    run_dir = Path(cfg.run.dir)
    sd = _gather(trainer.model, trainable_only=False)
    out = run_dir / "model"
    adapter_dir = None
    weights_step = result.step
    if trainer.world.is_main:
        shell = _export_shell(cfg, base_cfg, labels)
        backbone = _backbone(shell)
        if backbone.cfg.tie_embeddings:
            sd = {k: v for k, v in sd.items() if not k.endswith("output.weight") or k.startswith("score")}
        missing, unexpected = shell.load_state_dict(sd, assign=True, strict=False)
        missing = [k for k in missing if not (backbone.cfg.tie_embeddings and k.endswith("output.weight"))]
        if missing or unexpected:
            raise RuntimeError(f"fine-tuned state does not match the export structure: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        backbone.tie_weights()
        best = run_dir / BEST_DIR
        if cfg.eval.keep_best and result.best_step is not None and result.best_step != result.step:
            meta = json.loads((best / BEST_META).read_text()) if (best / BEST_META).is_file() else {}
            if meta.get("step") == result.best_step:
                best_sd = load_file(str(best / BEST_WEIGHTS))
                missing, unexpected = shell.load_state_dict(best_sd, strict=False)
                if unexpected:
                    raise RuntimeError(f"best weights hold unexpected keys {unexpected[:3]}")
                backbone.tie_weights()
                weights_step = result.best_step
                info(f"RUN/model gets the best weights: step {result.best_step} ({result.best_metric} "
                     f"{result.best_value:.4g}), not the last step {result.step}")
            else:
                info(f"note: {best} does not hold step {result.best_step}'s weights (an interrupted run); "
                     f"RUN/model gets the last step's")
        if cfg.uses_lora and cfg.lora.save_adapter:
            adapter_dir = str(save_adapter(shell, run_dir / "adapter", cfg, base_fingerprint, labels))
        if cfg.uses_lora:
            merge_lora(shell)
        extra = {"trained_with": "lmforge finetune", "finetune": {"mode": cfg.mode, "base_model": cfg.model.path,
                                                                    "step": weights_step}}
        identity = {"tokenizer_hash": tok_hash} if (tok_hash := tokenizer_dir_hash(cfg.model.path)) else {}
        extra.update(identity)  # checked against the copied tokenizer files whenever RUN/model is loaded
        if cfg.mode == "classify":
            # max_tokens: texts were cut to data.seq_len in training and its dev evaluation; `lmforge eval`
            # cuts them the same way, so its accuracy on the dev split equals the reported one
            save_classifier_dir(shell, out, labels, tokenizer_dir=cfg.model.path,
                                extra={**identity, "max_tokens": cfg.data.seq_len})
        elif cfg.mode == "reward":
            from lmforge.models.reward import save_reward_dir

            save_reward_dir(shell, out, tokenizer_dir=cfg.model.path, extra=identity)
        else:
            save_model_dir(shell, out, tokenizer_dir=cfg.model.path, extra=extra)
            if template is not None and cfg.data.chat_template is not None:
                save_chat_template(template, out)  # the template it was trained with travels with the model
    barrier()
    return str(out), adapter_dir, weights_step
