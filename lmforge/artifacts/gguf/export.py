"""Write an lmforge model dir as a GGUF file (llama.cpp, Ollama, LM Studio, transformers' GGUF loader).

Llama and Mistral shapes become llama.cpp's ``llama`` graph (q/k rows permuted, see ``tensors``), Qwen2
(biases on q/k/v) its ``qwen2`` graph, Qwen3 (``model.qk_norm``: RMSNorm over each q/k head) its ``qwen3``
graph, a squared-ReLU MLP (``activation: relu2``, the quickstart's) its ``arcee`` graph (llama's, with a
non-gated relu² MLP). The output is a directory holding ``model-<dtype>.gguf`` and an Ollama ``Modelfile``
that points at it; the directory appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from lmforge.artifacts.gguf.tensors import encode, gguf_name, rope_freq_factors, to_gguf_layout
from lmforge.artifacts.gguf.vocab import read_vocab
from lmforge.artifacts.metadata import read_metadata
from lmforge.artifacts.model_dir import check_model_dir, load_weights
from lmforge.atomic import atomic_directory
from lmforge.config import UserError
from lmforge.models.config import ModelConfig

GGUF_DTYPES = ("f32", "f16", "q8_0")
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7}  # gguf.LlamaFileType: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
# ModelConfig fields the GGUF graphs express (or that do not change the function); any other field
# with a non-default value (an option added later, e.g. QK-norm) makes export refuse instead of
# writing a file that computes something else.
_EXPRESSED = {"vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "ffn_multiplier",
              "multiple_of", "activation", "norm", "norm_eps", "norm_position", "pos_encoding", "rope_theta",
              "rope_scaling", "max_seq_len", "tie_embeddings", "bias", "qkv_bias", "dropout", "causal",
              "sliding_window", "embed_scale", "embedding_norm", "final_norm", "type_vocab_size", "lm_head",
              "init_std", "attention"}


def gguf_architecture(cfg: ModelConfig) -> str:
    """``llama``, ``qwen2``, ``qwen3`` or (a squared-ReLU MLP) ``arcee``; a UserError naming what does not fit
    otherwise."""
    if not (cfg.causal and cfg.lm_head and cfg.pos_encoding == "rope" and cfg.activation in ("swiglu", "relu2")
            and cfg.norm == "rmsnorm" and cfg.norm_position == "pre" and cfg.final_norm
            and not cfg.embedding_norm and not cfg.type_vocab_size and not cfg.embed_scale):
        raise UserError("GGUF export needs a Llama-family decoder (causal, pre-norm RMSNorm, SwiGLU or squared-ReLU "
                        "MLP, RoPE, LM head); "
                        "export other shapes with --format hf")
    if cfg.bias:
        raise UserError("this model has biases on every linear layer, which llama.cpp's llama graph does not "
                        "load; export it with --format hf")
    if cfg.rope_scaling is not None and cfg.rope_scaling.type != "llama3":
        raise UserError(f"rope_scaling type '{cfg.rope_scaling.type}' is not written to GGUF (only Llama-3 scaling "
                        "is); export it with --format hf")
    if cfg.qk_norm and cfg.qkv_bias:
        raise UserError("this model has QK-norm and q/k/v biases; llama.cpp's qwen3 graph has no biases: export "
                        "it with --format hf")
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    expressed = _EXPRESSED | {"qk_norm"}  # qk_norm: the qwen3 graph
    extra = sorted(k for k in defaults if k not in expressed and getattr(cfg, k) != defaults[k])
    if extra:
        raise UserError(f"model option(s) {', '.join('model.' + k for k in extra)} have no GGUF "
                        "(llama/qwen2/qwen3/arcee) equivalent; a GGUF file needs a model trained without them")
    if cfg.activation == "relu2":
        if cfg.qkv_bias or cfg.qk_norm or cfg.sliding_window is not None:
            raise UserError("llama.cpp's arcee graph (squared-ReLU MLP) has no q/k/v-only biases, QK-norm or sliding "
                            "window; a GGUF file needs a model trained without them")
        return "arcee"
    return "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias else "llama"


def modelfile_text(gguf_name: str, template: tuple[str, list[str]] | None, eos_token: str | None) -> str:
    """An Ollama Modelfile for the file (``ollama create NAME -f Modelfile``). ``template``: (Go TEMPLATE,
    stop strings) when the caller can spell the chat template in Ollama's syntax; else Ollama reads the
    GGUF's own template."""
    lines = [f"FROM ./{gguf_name}"]
    stops = []
    if template is not None:
        lines.append(f'TEMPLATE """{template[0]}"""')
        stops += template[1]
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"


def export_gguf(model_dir, out, dtype: str = "f16", tokenizer=None, add_bos: bool = False,
                name: str | None = None, extra_pre: dict[str, tuple[str, str]] | None = None,
                ollama_template: tuple[str, list[str]] | None = None) -> dict[str, Any]:
    """Write ``out/model-<dtype>.gguf`` (+ ``out/Modelfile``).

    ``tokenizer``: the model dir's lmforge tokenizer (special tokens, chat template); ``add_bos``: whether
    prompts start with BOS; ``extra_pre`` / ``ollama_template``: what ``lmforge.tokenizer.llama_cpp`` knows
    about lmforge's own tokenizers (this package does not import the tokenizer package)."""
    from gguf import GGUFWriter

    model_dir, out = Path(model_dir), Path(out)
    if dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype {dtype} is not a GGUF type; use one of {', '.join(GGUF_DTYPES)}")
    if out.resolve() == model_dir.resolve():
        raise UserError(f"--out '{out}' is the source directory; write to a new directory")
    meta = read_metadata(model_dir)
    if meta.kind != "model" or meta.task != "lm":
        what = "an adapter" if meta.kind == "adapter" else f"a {meta.task}"
        raise UserError(f"'{model_dir}' is {what} model dir; GGUF export writes language models (pass RUN/model)")
    cfg = meta.model_config()
    arch = gguf_architecture(cfg)
    if tokenizer is None:
        raise UserError(f"'{model_dir}' has no tokenizer; a GGUF file must carry one (copy the tokenizer files "
                        "into the model dir)")
    specials = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "padding": tokenizer.pad_token}
    vocab = read_vocab(model_dir, cfg.vocab_size, specials, tokenizer.chat_template, extra_pre)
    warnings = [vocab.note] if vocab.note else []
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.max_seq_len:
        warnings.append(f"sliding_window={cfg.sliding_window} is not in llama.cpp's llama graph: beyond "
                        f"{cfg.sliding_window} tokens of context the GGUF attends to all keys")
    check_model_dir(model_dir, cfg)  # a config that disagrees with its tensors is never exported
    sd = load_weights(model_dir)
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)  # llama.cpp reuses token_embd when output.weight is absent
    name = name or model_dir.resolve().name
    file_name = f"model-{dtype}.gguf"
    counts: dict[str, int] = {}
    with atomic_directory(out) as tmp:
        w = GGUFWriter(str(tmp / file_name), arch)
        w.add_name(name)
        w.add_file_type(_FILE_TYPE[dtype])
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.dim)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(float(cfg.rope_theta))
        w.add_layer_norm_rms_eps(float(cfg.norm_eps))
        w.add_vocab_size(cfg.vocab_size)
        if dtype == "q8_0":
            from gguf import GGML_QUANT_VERSION

            w.add_quantization_version(GGML_QUANT_VERSION)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.token_types)
        w.add_token_merges(vocab.merges)
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("padding", w.add_pad_token_id)):
            if key in vocab.special_ids:
                add(vocab.special_ids[key])
        w.add_add_bos_token(bool(add_bos))
        w.add_add_eos_token(False)
        if vocab.chat_template:
            w.add_chat_template(vocab.chat_template)
        factors = rope_freq_factors(cfg)
        if factors is not None:  # Llama-3 RoPE scaling: llama.cpp divides each base frequency by these
            w.add_tensor("rope_freqs.weight", factors.numpy())
            counts["f32"] = counts.get("f32", 0) + 1
        n_params = 0
        for key in sorted(sd, key=_tensor_order):
            t = to_gguf_layout(key, sd[key], cfg, permute_qk=arch in ("llama", "arcee"))
            n_params += t.numel()
            data, raw = encode(t, dtype)
            kind = raw.name.lower() if raw is not None else ("f16" if data.dtype.itemsize == 2 else "f32")
            counts[kind] = counts.get(kind, 0) + 1
            w.add_tensor(gguf_name(key, arch), data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        size = (tmp / file_name).stat().st_size
        eos = tokenizer.eos_token if "eos" in vocab.special_ids else None
        (tmp / "Modelfile").write_text(modelfile_text(file_name, ollama_template, eos), encoding="utf-8")
    return {"format": "gguf", "architecture": arch, "out": str(out), "file": str(out / file_name),
            "dtype": dtype, "params": n_params, "bytes": size, "tensor_types": counts,
            "tokenizer": {"model": "gpt2", "pre": vocab.pre, "tokens": len(vocab.tokens),
                          "merges": len(vocab.merges), "special_ids": vocab.special_ids},
            "chat_template": bool(vocab.chat_template), "add_bos": bool(add_bos), "warnings": warnings,
            "files": [file_name, "Modelfile"]}


def _tensor_order(key: str) -> tuple:
    """Embedding, then layers in numeric order, then the final norm and head (llama.cpp's order)."""
    m = re.match(r"layers\.(\d+)\.", key)
    if m:
        return (1, int(m.group(1)), key)
    return (0 if key.startswith("tok_embeddings") else 2, 0, key)
