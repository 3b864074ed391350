"""The one reader/writer of every on-disk model artifact (layer 2: reads models, tokenizer, config).

* ``metadata``: the one schema (``lmforge`` block with ``format_version``) and its one reader,
  `read_metadata(dir) -> ArtifactInfo` (old formats converted; bounded JSON reader; no torch import).
* ``model_dir``: config.json + safetensors (+ tokenizer files) of a language model; strict loading.
* ``classifier_dir`` / ``reward_dir`` / ``heads_dir``: the same dir with a classifier head, a reward
  head, or injected encoder heads (``heads.safetensors``).
* ``adapter_dir``: LoRA adapters referring to a base model dir by a fingerprint.
* ``consolidate``: the one path from a (sharded) training model to a full state dict in a meta shell.
* ``hf`` / ``gguf``: Hugging Face import/export and GGUF export.
* ``identity``: a model dir's tokenizer files against the hash its metadata records.

Only the torch-free metadata API is imported here; import the submodules for the rest.
"""

from __future__ import annotations

from lmforge.artifacts.metadata import (
    ADAPTER_CONFIG,
    CONFIG_NAME,
    FORMAT_VERSION,
    TASKS,
    ArtifactInfo,
    is_adapter_dir,
    is_model_dir,
    kind,
    read_metadata,
)

__all__ = ["ADAPTER_CONFIG", "CONFIG_NAME", "FORMAT_VERSION", "TASKS", "ArtifactInfo", "is_adapter_dir",
           "is_model_dir", "kind", "read_metadata"]
