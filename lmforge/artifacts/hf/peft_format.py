"""The PEFT LoRA adapter format (``adapter_config.json`` + ``adapter_model.safetensors`` as the ``peft``
package saves them), for the Hugging Face export of the base model: the one owner of that format.

    adapter_config.json        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16.0,
                                "target_modules": ["q_proj", "v_proj"], "bias": "none", …}
    adapter_model.safetensors  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  (r × in)
                               base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  (out × r)

lmforge's ``LoRALinear`` computes the same function as PEFT's LoRA layer (``lora_A`` / ``lora_B`` hold the
same matrices, scaling ``lora_alpha / r``), so only the names change, through the family's templated module
map (`lmforge.artifacts.hf.families`). Families whose projections are ``nn.Linear`` in HF (Llama, Mistral,
Qwen2, Qwen3, …) are expressible; GPT-2's fused Conv1D and BERT are not (their adapters stay lmforge-only).
No torch here: tensors are only renamed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from lmforge.artifacts.hf.families import FAMILIES, Family, family_for_model_config, require_hf_expressible
from lmforge.config import UserError
from lmforge.models.config import ModelConfig

PEFT_PREFIX = "base_model.model."
# lmforge LoRA module short name -> the lmforge module template it lives at.
_LM_TEMPLATES = {"wq": "layers.{i}.attention.wq", "wk": "layers.{i}.attention.wk",
                 "wv": "layers.{i}.attention.wv", "wo": "layers.{i}.attention.wo",
                 "w1": "layers.{i}.feed_forward.w1", "w2": "layers.{i}.feed_forward.w2",
                 "w3": "layers.{i}.feed_forward.w3"}
# PEFT options lmforge's LoRA does not compute: (key, the value lmforge needs, what to say).
_UNSUPPORTED = (("use_dora", False, "DoRA"), ("use_rslora", False, "rank-stabilized scaling (use_rslora)"),
                ("rank_pattern", {}, "per-module ranks (rank_pattern)"),
                ("alpha_pattern", {}, "per-module alphas (alpha_pattern)"),
                ("modules_to_save", None, "fully trained extra modules (modules_to_save)"),
                ("layers_to_transform", None, "a subset of layers (layers_to_transform)"),
                ("fan_in_fan_out", False, "Conv1D layouts (fan_in_fan_out)"))


def _linear_hf_name(family: Family, short: str) -> str | None:
    entry = family.modules.get(_LM_TEMPLATES[short])
    if not isinstance(entry, str):  # absent, or a fused / transposed layout PEFT stores differently
        return None
    return entry


def peft_family(cfg: ModelConfig, record: Mapping[str, Any] | None, family: str | None = None
                ) -> Family | None:
    """The HF family a PEFT adapter on a base of config ``cfg`` (and its import record) is named for, as
    `export_hf` would export the base; None when that family's projections are not plain linears."""
    try:
        require_hf_expressible(cfg)
        if family is not None:
            fam = FAMILIES[family]
        elif (record or {}).get("family") in FAMILIES:
            fam = FAMILIES[record["family"]]
        else:
            fam = family_for_model_config(cfg)
        fam.to_hf(cfg)  # the base exports as this family (else its adapter names would be for nothing)
    except (UserError, KeyError):
        return None
    present = [s for s in _LM_TEMPLATES if fam.modules.get(_LM_TEMPLATES[s]) is not None]
    if not cfg.causal or "wq" not in present or any(_linear_hf_name(fam, s) is None for s in present):
        return None
    return fam


def peft_config(family: Family, rank: int, alpha: float, lm_targets: Sequence[str], base_name: str,
                dropout: float = 0.0) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for LoRA on ``lm_targets`` (lmforge short names: wq, …, w3)."""
    targets = sorted({_linear_hf_name(family, s).rsplit(".", 1)[-1] for s in lm_targets})
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": int(rank), "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
            "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
            "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True, "revision": None}


def to_peft_names(family: Family, sd: Mapping[str, Any]) -> dict[str, Any]:
    """lmforge adapter tensors (``layers.0.attention.wq.lora_A``) → PEFT's names."""
    out = {}
    for key, t in sd.items():
        module, _, param = key.rpartition(".")
        entry = family.module_entry(module)
        if param not in ("lora_A", "lora_B") or entry is None or entry[1] != "linear":
            raise UserError(f"adapter tensor '{key}' has no PEFT name in the {family.name} family")
        out[f"{PEFT_PREFIX}{entry[0]}.{param}.weight"] = t
    return out


def _hf_to_lm_modules(family: Family) -> list[tuple[re.Pattern[str], str]]:
    pats = []
    for short, lm_template in _LM_TEMPLATES.items():
        hf = _linear_hf_name(family, short)
        if hf is not None:
            pats.append((re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(\d+)") + "$"), lm_template))
    return pats


def from_peft_names(family: Family, sd: Mapping[str, Any]) -> dict[str, Any]:
    """PEFT's tensor names (with or without an adapter name such as ``.default``) → lmforge's."""
    pats = _hf_to_lm_modules(family)
    out = {}
    for key, t in sd.items():
        m = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[A-Za-z0-9_-]+)?\.weight$", key)
        lm = None
        if m:
            for pat, template in pats:
                hit = pat.match(m.group(1))
                if hit:
                    lm = f"{template.format(i=hit.group(1))}.{m.group(2)}"
                    break
        if lm is None:
            raise UserError(f"PEFT adapter tensor '{key}' is not a LoRA matrix of a {family.name} attention or "
                            "MLP projection; lmforge loads LoRA on q/k/v/o and gate/up/down projections only")
        out[lm] = t
    return out


def is_peft_config(raw: Mapping[str, Any]) -> bool:
    return raw.get("peft_type") is not None


def lora_settings(raw: Mapping[str, Any], family: Family, where: str) -> dict[str, Any]:
    """rank, alpha, lmforge targets of a PEFT LoRA config; options lmforge does not compute are refused."""
    if str(raw.get("peft_type")).upper() != "LORA":
        raise UserError(f"{where}: peft_type '{raw.get('peft_type')}' is not supported; lmforge loads LoRA adapters")
    if raw.get("bias", "none") != "none":
        raise UserError(f"{where}: bias='{raw.get('bias')}' (trained biases) is not supported; lmforge loads "
                        "LoRA adapters trained with bias='none'")
    for key, ok, what in _UNSUPPORTED:
        if raw.get(key) not in (ok, None) and raw.get(key) != ok:
            raise UserError(f"{where}: {what} is not supported by lmforge's LoRA; train with {key}={ok!r}")
    targets = raw.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise UserError(f"{where}: target_modules={targets!r} must be a list of module names (q_proj, …)")
    by_hf = {_linear_hf_name(family, s).rsplit(".", 1)[-1]: s for s in _LM_TEMPLATES
             if _linear_hf_name(family, s) is not None}
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in by_hf]
    if unknown:
        raise UserError(f"{where}: target_modules {unknown} are not {family.name} attention or MLP projections "
                        f"({', '.join(sorted(by_hf))}); lmforge adapts those only")
    return {"rank": int(raw["r"]), "alpha": float(raw["lora_alpha"]),
            "targets": sorted({by_hf[t.rsplit('.', 1)[-1]] for t in targets})}


__all__ = ["PEFT_PREFIX", "from_peft_names", "is_peft_config", "lora_settings", "peft_config", "peft_family",
           "to_peft_names"]
