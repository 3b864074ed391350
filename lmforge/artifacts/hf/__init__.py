"""Hugging Face interop: a state-dict adapter (templated key map) and config translation per family.

``import_hf(hf_dir, out)`` turns a ``transformers`` checkpoint (Llama, Mistral, Qwen2, GPT-2, BERT) into an
lmforge model dir; ``export_hf(model_dir, out)`` writes one that ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained(out)`` load offline. Names are imported lazily (no torch on import).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FAMILIES": "lmforge.artifacts.hf.families",
    "family_for_hf_config": "lmforge.artifacts.hf.families",
    "family_for_model_config": "lmforge.artifacts.hf.families",
    "hf_to_model_config": "lmforge.artifacts.hf.families",
    "model_config_to_hf": "lmforge.artifacts.hf.families",
    "hf_to_lmforge_state_dict": "lmforge.artifacts.hf.convert",
    "lmforge_to_hf_state_dict": "lmforge.artifacts.hf.convert",
    "read_hf_checkpoint": "lmforge.artifacts.hf.convert",
    "import_hf": "lmforge.artifacts.hf.convert",
    "export_hf": "lmforge.artifacts.hf.convert",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lmforge.artifacts.hf' has no attribute '{name}'")
