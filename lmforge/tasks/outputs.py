"""The end of a fine-tuning run: the best evaluation's weights kept in RUN/best/ (``eval.keep_best``), and
RUN/model (best or last weights; LoRA merged) plus RUN/adapter.

What differs between tasks comes from the task (`lmforge.tasks.finetuning.FinetuneTask`): the structure to
load the weights into (``shell``), how RUN/model is written (``save_dir``: an LM, classifier or reward dir)
and what RUN/adapter records about the head (``adapter_meta``). Gathering a (sharded) model into that
structure is `lmforge.artifacts.consolidate`, the one consolidation path."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from lmforge.artifacts.adapter_dir import save_adapter_dir
from lmforge.artifacts.consolidate import consolidate, drop_shared, gather_state_dict
from lmforge.artifacts.model_dir import save_weights
from lmforge.atomic import atomic_directory
from lmforge.config import read_json_bounded
from lmforge.console import info
from lmforge.distributed.world import barrier
from lmforge.models.lora import lora_state_dict, merge_lora

BEST_DIR = "best"
BEST_WEIGHTS = "weights.safetensors"
BEST_META = "best.json"


def save_adapter(model, directory: Path, cfg, base_fingerprint: str, task_meta: dict[str, Any]) -> Path:
    """RUN/adapter: the LoRA tensors (+ a classifier head) and a reference to the base model dir;
    ``task_meta`` is the task's part of adapter_config.json (``task``, and a classifier's labels/pooling)."""
    sd = lora_state_dict(model)
    sd.update({k: v for k, v in model.state_dict().items() if k.startswith("score.")})
    return save_adapter_dir(directory, sd, cfg.model.path, base_fingerprint, cfg.lora.rank, cfg.lora.alpha,
                            cfg.lora.targets, task=task_meta.get("task", "lm"), labels=task_meta.get("labels"),
                            pooling=task_meta.get("pooling"))


def save_best(trainer, run_dir: Path) -> None:
    """on_best hook: keep the trainable weights of the best evaluation in RUN/best/ (all ranks call it)."""
    # tied weights (embeddings = output) are stored once; tie_weights() restores them
    sd = drop_shared(gather_state_dict(trainer.model, trainable_only=True))
    if trainer.world.is_main:
        meta = {"step": trainer.step, "metric": trainer.best_metric, "value": trainer.best_val}
        with atomic_directory(run_dir / BEST_DIR) as tmp:
            save_weights(sd, tmp, weights_name=BEST_WEIGHTS)
            (tmp / BEST_META).write_text(json.dumps(meta, indent=1))
    barrier()


def _backbone(model):
    return getattr(model, "backbone", model)


def export(trainer, result, cfg, shell, save_dir: Callable[[Any, Path, int], Any], adapter_meta: dict[str, Any] | None,
           base_fingerprint: str) -> tuple[str | None, str | None, int | None]:
    """Write RUN/model (best or last weights; LoRA merged) and RUN/adapter. ``shell()`` builds the trained
    structure on the meta device (backbone [+ head] [+ LoRA]); ``save_dir(model, out, weights_step)`` writes
    RUN/model; ``adapter_meta`` (None: no LoRA) is the task's part of RUN/adapter's config. Returns
    (model dir, adapter dir, step whose weights RUN/model holds)."""
    run_dir = Path(cfg.run.dir)
    model = consolidate(trainer.model, trainer.world.is_main, keep_extra=False, build_shell=shell)
    out = run_dir / "model"
    adapter_dir = None
    weights_step = result.step
    if trainer.world.is_main:
        backbone = _backbone(model)
        best = run_dir / BEST_DIR
        if cfg.eval.keep_best and result.best_step is not None and result.best_step != result.step:
            meta = read_json_bounded(best / BEST_META, what="best-weights record") \
                if (best / BEST_META).is_file() else {}
            if isinstance(meta, dict) and meta.get("step") == result.best_step:
                best_sd = load_file(str(best / BEST_WEIGHTS))
                missing, unexpected = model.load_state_dict(best_sd, strict=False)
                if unexpected:
                    raise RuntimeError(f"best weights hold unexpected keys {unexpected[:3]}")
                backbone.tie_weights()
                weights_step = result.best_step
                info(f"RUN/model gets the best weights: step {result.best_step} ({result.best_metric} "
                     f"{result.best_value:.4g}), not the last step {result.step}")
            else:
                info(f"note: {best} does not hold step {result.best_step}'s weights (an interrupted run); "
                     f"RUN/model gets the last step's")
        if adapter_meta is not None and cfg.lora.save_adapter:
            adapter_dir = str(save_adapter(model, run_dir / "adapter", cfg, base_fingerprint, adapter_meta))
        if adapter_meta is not None:
            merge_lora(model)
        save_dir(model, out, weights_step)
    barrier()
    return str(out), adapter_dir, weights_step
