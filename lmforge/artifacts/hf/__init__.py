"""Hugging Face interop: a state-dict adapter (templated key map) and config translation per family.

``convert.import_hf(hf_dir, out)`` turns a ``transformers`` checkpoint (Llama, Mistral, Qwen2, Arcee, GPT-2,
BERT) into an lmforge model dir; ``convert.export_hf(model_dir, out)`` writes one that
``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(out)`` load offline; ``families`` maps configs per
family (``arcee``: the squared-ReLU Llama, registered here since it builds on ``families``);
``tokenizer_files`` writes the tokenizer side.
"""

from lmforge.artifacts.hf.arcee import ARCEE
from lmforge.artifacts.hf.families import FAMILIES

FAMILIES.setdefault(ARCEE.name, ARCEE)
