"""What llama.cpp and Ollama need to know about lmforge's own tokenizers (``export --format gguf``).

llama.cpp names its pre-tokenizers instead of reading a regex. lmforge's CJK-aware split is written as
``smaug-bpe`` (Llama-3's regex, no ``ignore_merges``): Llama-3's pieces are unions of lmforge's (it does not
cut a Han run from adjacent Latin letters or a leading punctuation mark), and BPE never merges across
lmforge's piece boundaries, because the merges were learned inside them, so the tokens agree. Only letters
followed by combining marks (``\\p{M}``: Devanagari, Thai, decomposed accents), which lmforge keeps in one
piece and Llama-3 splits, can tokenize differently.
"""

from __future__ import annotations

from lmforge.tokenizer.core import DEFAULT_CHAT_TEMPLATE, END
from lmforge.tokenizer.train import PRETOKENIZE_PATTERN

# tokenizer.json split regex -> (llama.cpp pre-tokenizer name, note for the export summary)
PRE_TOKENIZERS = {
    PRETOKENIZE_PATTERN: ("smaug-bpe", ("lmforge's CJK-aware split written as llama.cpp's 'smaug-bpe' (the Llama-3 "
                                       "regex); text with combining marks may tokenize differently")),
}


def ollama_template(chat_template: str | None) -> tuple[str, list[str]] | None:
    """(Ollama Go TEMPLATE, stop strings) for lmforge's default chat template; None for any other (Ollama
    then reads the template from the GGUF metadata)."""
    if chat_template != DEFAULT_CHAT_TEMPLATE:
        return None
    # <|user|>\nHi<|end|>\n ... <|assistant|>\n  -- the same text the Jinja template renders
    go = "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}" + END + "\n{{ end }}<|assistant|>\n"
    return go, [END]
