"""GGUF export (llama.cpp / Ollama): an lmforge model dir → one ``.gguf`` file written with the ``gguf``
package (llama.cpp's own writer).

* ``tensors``: lmforge tensor names → llama.cpp's, the q/k row permutation llama.cpp's ``llama`` graph
  expects, and the per-tensor storage type (f32 / f16 / q8_0).
* ``vocab``: the tokenizer as GGUF metadata (``tokenizer.ggml.*``: tokens, token types, merges, special ids,
  pre-tokenizer name, chat template).
* ``export``: the file itself (architecture hyper-parameters, atomic write) and an Ollama ``Modelfile``.
* ``lora``: a LoRA adapter dir → a GGUF LoRA file (``llama-cli --lora``) for the base's graph.
"""

from __future__ import annotations

from lmforge.artifacts.gguf.export import GGUF_DTYPES, export_gguf

__all__ = ["GGUF_DTYPES", "export_gguf"]
