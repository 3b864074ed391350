"""Hugging Face interop: a state-dict adapter (templated key map) and config translation per family.

``convert.import_hf(hf_dir, out)`` turns a ``transformers`` checkpoint (Llama, Mistral, Qwen2, Qwen3, Phi-3,
Arcee, GPT-2, BERT) into an lmforge model dir; ``convert.export_hf(model_dir, out)`` writes one that
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(out)`` load offline; ``families`` maps configs per
family (the families beyond the first five live in their own modules and are registered here, since they
build on ``families``); ``tokenizer_files`` writes the tokenizer side.
"""

from lmforge.artifacts.hf import (
    phi3,  # noqa: F401  (registers the Phi-3 family in families.FAMILIES)
    qwen3,  # noqa: F401  (registers the Qwen3 family in families.FAMILIES)
)
from lmforge.artifacts.hf.arcee import ARCEE
from lmforge.artifacts.hf.families import FAMILIES

FAMILIES.setdefault(ARCEE.name, ARCEE)
