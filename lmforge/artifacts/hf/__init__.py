"""Hugging Face interop: a state-dict adapter (templated key map) and config translation per family.

``convert.import_hf(hf_dir, out)`` turns a ``transformers`` checkpoint (Llama, Mistral, Qwen2, Qwen3, Phi-3, GPT-2, BERT)
into an lmforge model dir; ``convert.export_hf(model_dir, out)`` writes one that ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained(out)`` load offline; ``families`` maps configs per family;
``tokenizer_files`` writes the tokenizer side.
"""

from lmforge.artifacts.hf import (
    phi3,  # noqa: F401  (registers the Phi-3 family in families.FAMILIES)
    qwen3,  # noqa: F401  (registers the Qwen3 family in families.FAMILIES)
)
