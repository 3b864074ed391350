"""The end of a fine-tuning run: the best evaluation's weights kept in RUN/best/ (``eval.keep_best``), and
RUN/model (best or last weights; LoRA merged) plus RUN/adapter.

What differs between tasks comes from the task (`lmforge.tasks.finetuning.FinetuneTask`): the structure to
load the weights into (``shell``), how RUN/model is written (``save_dir``: an LM, classifier or reward dir)
and what RUN/adapter records about the head (``adapter_meta``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lmforge.atomic import atomic_directory
from lmforge.console import info
from lmforge.models.adapter_dir import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lmforge.models.lora import lora_state_dict, merge_lora
from lmforge.models.model_dir import save_weights
from lmforge.train.parallel import barrier

BEST_DIR = "best"
BEST_WEIGHTS = "weights.safetensors"
BEST_META = "best.json"


def save_adapter(model, directory: Path, cfg, base_fingerprint: str, task_meta: dict[str, Any]) -> Path:
    """RUN/adapter: the LoRA tensors (+ a classifier head) and a reference to the base model dir;
    ``task_meta`` is the task's part of adapter_config.json (``task``, and a classifier's labels/pooling)."""
    sd = lora_state_dict(model)
    sd.update({k: v for k, v in model.state_dict().items() if k.startswith("score.")})
    meta = {"base_model": str(Path(cfg.model.path).resolve()), "base_fingerprint": base_fingerprint,
            "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets),
            "task": task_meta.get("task", "lm"), "lmforge_version": __import__("lmforge").__version__}
    meta.update({k: v for k, v in task_meta.items() if k != "task"})

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
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=trainable_only))


def save_best(trainer, run_dir: Path) -> None:
    """on_best hook: keep the trainable weights of the best evaluation in RUN/best/ (all ranks call it)."""
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


def _backbone(model):
    return getattr(model, "backbone", model)


def export(trainer, result, cfg, shell, save_dir: Callable[[Any, Path, int], Any], adapter_meta: dict[str, Any] | None,
           base_fingerprint: str) -> tuple[str | None, str | None, int | None]:
    """Write RUN/model (best or last weights; LoRA merged) and RUN/adapter. ``shell()`` builds the trained
    structure on the meta device (backbone [+ head] [+ LoRA]); ``save_dir(model, out, weights_step)`` writes
    RUN/model; ``adapter_meta`` (None: no LoRA) is the task's part of RUN/adapter's config. Returns
    (model dir, adapter dir, step whose weights RUN/model holds)."""
    run_dir = Path(cfg.run.dir)
    sd = _gather(trainer.model, trainable_only=False)
    out = run_dir / "model"
    adapter_dir = None
    weights_step = result.step
    if trainer.world.is_main:
        model = shell()
        backbone = _backbone(model)
        if backbone.cfg.tie_embeddings:
            sd = {k: v for k, v in sd.items() if not k.endswith("output.weight") or k.startswith("score")}
        missing, unexpected = model.load_state_dict(sd, assign=True, strict=False)
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
