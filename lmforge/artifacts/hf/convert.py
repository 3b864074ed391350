"""Moving tensors between a Hugging Face checkpoint and an lmforge model dir.

Conversion never changes a value: tensors keep their dtype and bytes (GPT-2's Conv1D weights are
transposed, its fused ``c_attn`` split / concatenated), so import → export reproduces every tensor bit for
bit. Reading never unpickles except ``pytorch_model.bin`` through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lmforge.artifacts.heads_dir import HEADS_NAME, read_head_tensors, save_head_tensors
from lmforge.artifacts.hf import tokenizer_files
from lmforge.artifacts.hf.families import (
    FAMILIES,
    Family,
    family_for_hf_config,
    family_for_model_config,
    hf_to_model_config,
    model_config_to_hf,
    require_hf_expressible,
)
from lmforge.artifacts.metadata import CONFIG_NAME, model_config_json, read_metadata, write_json
from lmforge.artifacts.model_dir import (
    DEFAULT_SHARD_BYTES,
    check_model_dir,
    check_shapes,
    index_shards,
    load_weights,
    read_safetensors,
    save_weights,
    write_model_dir,
)
from lmforge.atomic import atomic_directory
from lmforge.config import UserError, read_json_bounded, to_dict
from lmforge.models.config import ModelConfig
from lmforge.models.transformer import Transformer

HF_CONFIG = "config.json"
HF_GENERATION_CONFIG = "generation_config.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- reading a HF checkpoint -------------------------------------------------------------------------
def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(hf_dir) / HF_CONFIG
    if not Path(hf_dir).is_dir():
        raise UserError(f"Hugging Face model dir '{hf_dir}' does not exist; pass a local directory "
                        "(lmforge never downloads: use `huggingface-cli download` first)")
    if not path.is_file():
        raise UserError(f"'{hf_dir}' has no {HF_CONFIG}; pass a Hugging Face model directory")

    data = read_json_bounded(path, what="Hugging Face config")
    if not isinstance(data, dict):
        raise UserError(f"'{path}' is not a Hugging Face config (a JSON object); pass a model directory")
    return data


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary pickles: say so instead of a traceback
        raise UserError(f"'{path}' cannot be read safely ({type(e).__name__}); convert it to safetensors "
                        "with a trusted tool first") from None


def read_hf_weights(hf_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a HF checkpoint: model.safetensors, sharded safetensors + index, or pytorch_model.bin."""
    d = Path(hf_dir)
    candidates = [("model.safetensors", read_safetensors), ("pytorch_model.bin", _load_bin)]
    for name, loader in candidates:
        if (d / name).is_file():
            return loader(d / name)
        index = d / f"{name.rsplit('.', 1)[0]}.{name.rsplit('.', 1)[1]}.index.json"
        if index.is_file():
            out: dict[str, torch.Tensor] = {}
            for p in index_shards(index, "download the checkpoint again, with every shard"):
                out.update(loader(p))
            return out
    raise UserError(f"'{hf_dir}' holds no model.safetensors, sharded safetensors index or pytorch_model.bin")


def read_hf_checkpoint(hf_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    return read_hf_config(hf_dir), read_hf_weights(hf_dir)


# ---- state-dict adapters ---------------------------------------------------------------------------
def _expected_keys(cfg: ModelConfig) -> list[str]:
    """The backbone's checkpoint keys (the tied output weight excluded), from a model built on meta."""
    with torch.device("meta"):
        model = Transformer(cfg)
    keys = list(model.state_dict())
    return [k for k in keys if not (cfg.tie_embeddings and k == "output.weight")]


def _split_param(lm_key: str) -> tuple[str, str]:
    module, _, param = lm_key.rpartition(".")
    return module, param


def _fused_sizes(cfg: ModelConfig, layout: tuple) -> list[int]:
    """Row counts of the parts of a fused tensor: q/k/v (GPT-2's c_attn, Phi-3's qkv_proj) or, for a layout
    tagged "gate_up" (Phi-3's gate_up_proj), gate and up."""
    if layout[3:] == ("gate_up",):
        return [cfg.hidden_dim, cfg.hidden_dim]
    return [cfg.q_dim, cfg.kv_dim, cfg.kv_dim]


def hf_to_lmforge_state_dict(family: Family, cfg: ModelConfig, hf_sd: dict[str, torch.Tensor]
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """HF tensors → (backbone state dict, heads state dict, dropped HF keys). Strict: a tensor the family
    does not know, or a missing one, is an error naming it."""
    canon: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in hf_sd.items():
        c = family.normalize_key(k)
        if c is None:
            dropped.append(k)
        else:
            canon[c] = v
    if cfg.tie_embeddings and "lm_head.weight" in canon and family.modules.get("output") == "lm_head":
        canon.pop("lm_head.weight")  # tied: the embedding is the head (some checkpoints store both)
        dropped.append("lm_head.weight")
    used: set[str] = set()
    out: dict[str, torch.Tensor] = {}
    for lm_key in _expected_keys(cfg):
        module, param = _split_param(lm_key)
        entry = family.module_entry(module)
        if entry is None:
            raise UserError(f"{family.name}: no Hugging Face name for lmforge tensor '{lm_key}'")
        hf_module, layout = entry
        hf_key = f"{hf_module}.{param}"
        if hf_key not in canon:
            raise UserError(f"{family.name} checkpoint is missing '{hf_key}' (needed for '{lm_key}'); "
                            "the checkpoint and its config.json disagree")
        t = canon[hf_key]
        used.add(hf_key)
        if isinstance(layout, tuple):  # ("fused", part, "conv1d" | "linear"[, "gate_up"]): a slice of a fused tensor
            _, part, inner = layout[:3]
            full = t.t() if (inner == "conv1d" and param == "weight") else t
            sizes = _fused_sizes(cfg, layout)
            start = sum(sizes[:part])
            t = full[start:start + sizes[part]]
        elif layout == "conv1d" and param == "weight":
            t = t.t()
        out[lm_key] = t.contiguous()
    heads: dict[str, torch.Tensor] = {}
    for lm_key, hf_key in family.head_keys.items():
        if hf_key in canon:
            heads[lm_key] = canon[hf_key]
            used.add(hf_key)
    unknown = sorted(set(canon) - used)
    if unknown:
        raise UserError(f"{family.name} checkpoint has tensors lmforge does not know: {unknown[:4]}"
                        f"{' …' if len(unknown) > 4 else ''}; is config.json from the same model?")
    for name in {k.split(".")[0] for k in heads}:
        need = [k for k in family.head_keys if k.startswith(name + ".")]
        missing = [k for k in need if k not in heads]
        if missing:
            raise UserError(f"{family.name} checkpoint has part of the '{name}' head but lacks "
                            f"{[family.head_keys[k] for k in missing]}")
    return out, heads, dropped


def lmforge_to_hf_state_dict(family: Family, cfg: ModelConfig, sd: dict[str, torch.Tensor],
                             heads: dict[str, torch.Tensor] | None = None, prefix: str = ""
                             ) -> dict[str, torch.Tensor]:
    """lmforge backbone (+ heads) tensors → HF tensors. ``prefix`` goes before backbone keys
    (``bert.`` for BertForMaskedLM)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for lm_key in _expected_keys(cfg):
        if lm_key not in sd:
            raise UserError(f"model weights lack '{lm_key}'; the model dir is incomplete")
        module, param = _split_param(lm_key)
        entry = family.module_entry(module)
        if entry is None:
            raise UserError(f"lmforge tensor '{lm_key}' has no {family.name} equivalent")
        hf_module, layout = entry
        hf_key = ("" if hf_module == "lm_head" else prefix) + f"{hf_module}.{param}"
        t = sd[lm_key]
        if isinstance(layout, tuple):
            _, part, inner = layout[:3]
            fused.setdefault(hf_key, {})[part] = t
            n_parts = len(_fused_sizes(cfg, layout))
            if len(fused[hf_key]) == n_parts:
                full = torch.cat([fused[hf_key][i] for i in range(n_parts)], dim=0)
                out[hf_key] = (full.t() if inner == "conv1d" and param == "weight" else full).contiguous()
            continue
        if layout == "conv1d" and param == "weight":
            t = t.t()
        out[hf_key] = t.contiguous()
    for lm_key, t in (heads or {}).items():
        if lm_key not in family.head_keys:
            raise UserError(f"head tensor '{lm_key}' has no {family.name} equivalent")
        hf_key = family.head_keys[lm_key]
        if hf_key.startswith("pooler."):
            hf_key = prefix + hf_key
        out[hf_key] = t.contiguous()
    return out


# ---- model dirs ------------------------------------------------------------------------------------
def _check_out(src: Path, out: Path) -> None:
    if out.resolve() == src.resolve():
        raise UserError(f"--out '{out}' is the source directory; write to a new directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a directory")


def _hf_dtype_name(t: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(t, str(t).removeprefix("torch."))


_HF_NAMES = {  # what a Hugging Face config.json calls the fields a size mismatch is traced to
    "llama": {"dim": "hidden_size", "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
              "ffn_hidden": "intermediate_size", "max_seq_len": "max_position_embeddings"},
    "gpt2": {"dim": "n_embd", "n_heads": "n_head", "n_kv_heads": "n_head", "ffn_hidden": "n_inner",
             "max_seq_len": "n_positions"},
}


def _check_hf_layers(family: Family, cfg: ModelConfig, hf_sd: dict[str, torch.Tensor], hf_dir: Path) -> None:
    """The HF config's layer count against the layers its tensors hold, before a model of that many layers
    is laid out (a ``num_hidden_layers`` of 10^9 would take minutes on the meta device alone)."""
    indices = set()
    for k in hf_sd:
        c = family.normalize_key(k)
        parts = (c or "").split(".")
        n = next((p for p in parts if p.isdigit()), None)
        if n is not None:
            indices.add(int(n))
    if indices and cfg.n_layers != max(indices) + 1:
        raise UserError(f"'{hf_dir / HF_CONFIG}' says {cfg.n_layers:,} layers but its weights hold "
                        f"{max(indices) + 1}; fix its layer count (num_hidden_layers / n_layer) or download "
                        "the checkpoint again")


def import_hf(hf_dir: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None,
              max_shard_bytes: int | None = None,
              tokenizer_hash: Callable[[Path], str | None] | None = None) -> dict[str, Any]:
    """Convert a Hugging Face checkpoint dir into an lmforge model dir. Returns a summary.

    ``tokenizer_hash(dir)`` (the CLI passes the tokenizer package's) hashes the imported tokenizer files;
    the hash is recorded in ``config.json`` so a later swap of ``tokenizer.json`` is caught on load."""
    hf_dir, out = Path(hf_dir), Path(out)
    _check_out(hf_dir, out)
    hf_cfg = read_hf_config(hf_dir)
    family = family_for_hf_config(hf_cfg)
    cfg = hf_to_model_config(hf_cfg, family)
    hf_sd = read_hf_weights(hf_dir)
    _check_hf_layers(family, cfg, hf_sd, hf_dir)
    sd, heads, dropped = hf_to_lmforge_state_dict(family, cfg, hf_sd)
    check_shapes(cfg, {k: tuple(v.shape) for k, v in sd.items()}, f"'{hf_dir / HF_CONFIG}'",
                 "fix its sizes (or download the checkpoint again: config.json and the weights must be one "
                 "model's)", names=_HF_NAMES.get(family.name, _HF_NAMES["llama"]))
    if dtype is not None:
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
        sd = {k: v.to(DTYPES[dtype]) for k, v in sd.items()}
        heads = {k: v.to(DTYPES[dtype]) for k, v in heads.items()}
    head_names = sorted({k.split(".")[0] for k in heads})
    generation = {}
    if (hf_dir / HF_GENERATION_CONFIG).is_file():
        generation = read_json_bounded(hf_dir / HF_GENERATION_CONFIG, what="generation config")
    n_params = sum(v.numel() for v in sd.values()) + sum(v.numel() for v in heads.values())
    record = {"family": family.name, "architecture": (hf_cfg.get("architectures") or [None])[0],
              "config": hf_cfg, "generation_config": generation}
    files: list[str] = []
    tok: dict[str, Any] = {}

    def write_more(tmp: Path) -> None:
        nonlocal tok
        files.extend(save_weights(sd, tmp, max_shard_bytes or DEFAULT_SHARD_BYTES))
        if heads:
            files.append(HEADS_NAME)
            save_head_tensors(heads, tmp, head_names)
        tok = tokenizer_files.import_tokenizer(hf_dir, tmp, hf_cfg, generation, cfg)
        digest = tokenizer_hash(tmp) if tokenizer_hash is not None and tok.get("files") else None
        if digest:  # the metadata records the imported tokenizer's identity
            write_json(tmp / CONFIG_NAME, model_config_json(to_dict(cfg), extra={"hf": record},
                                                            heads=head_names or None, tokenizer_hash=digest))

    write_model_dir(out, cfg, None, extra={"hf": record}, heads=head_names or None, write_more=write_more)
    dtypes = sorted({_hf_dtype_name(v.dtype) for v in sd.values()})
    return {"family": family.name, "architecture": record["architecture"], "out": str(out), "params": n_params,
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes, "heads": head_names, "files": files,
            "tokenizer": tok, "dropped": dropped}


def export_hf(model_dir: str | os.PathLike, out: str | os.PathLike, family: str | None = None,
              dtype: str | None = None, max_shard_bytes: int | None = None) -> dict[str, Any]:
    """Write a Hugging Face model dir (config.json, generation_config.json, safetensors, tokenizer files)."""
    model_dir, out = Path(model_dir), Path(out)
    _check_out(model_dir, out)
    meta = read_metadata(model_dir)
    if meta.kind == "adapter":
        raise UserError(f"'{model_dir}' is an adapter dir; export the merged RUN/model, or the adapter with "
                        "--format peft")
    if meta.task == "reward":  # a scalar-head reward model -> *ForSequenceClassification (num_labels=1)
        return export_reward_hf(model_dir, out, dtype)
    if meta.task == "classify":
        raise UserError(f"'{model_dir}' is a classifier model dir; export supports language models and "
                        "encoders (export the base model instead)")
    cfg = meta.model_config()
    require_hf_expressible(cfg)  # before anything is written
    record = meta.hf
    if family is not None:
        if family not in FAMILIES:
            raise UserError(f"--family {family} is not one of {', '.join(FAMILIES)}")
        fam = FAMILIES[family]
    elif record.get("family") in FAMILIES:
        fam = FAMILIES[record["family"]]
    else:
        fam = family_for_model_config(cfg)
    check_model_dir(model_dir, cfg)  # a config that disagrees with its tensors is never exported
    sd = load_weights(model_dir)
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
    heads: dict[str, torch.Tensor] = read_head_tensors(model_dir)
    if dtype is not None:
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
        sd = {k: v.to(DTYPES[dtype]) for k, v in sd.items()}
        heads = {k: v.to(DTYPES[dtype]) for k, v in heads.items()}
    base = dict(record.get("config") or {}) if record.get("family") == fam.name else {}
    arch = _export_architecture(fam, base, heads)
    prefix = "bert." if arch in ("BertForMaskedLM", "BertForPreTraining") else ""
    if fam.name == "bert" and arch == "BertModel":
        heads = {k: v for k, v in heads.items() if k.startswith("pooler.")}
    hf_cfg = model_config_to_hf(cfg, fam, base)  # first: a family that cannot express cfg says why
    hf_sd = lmforge_to_hf_state_dict(fam, cfg, sd, heads, prefix)
    hf_cfg["architectures"] = [arch]
    weight_dtype = next(iter(sd.values())).dtype
    hf_cfg.pop("dtype", None)
    hf_cfg["torch_dtype"] = _hf_dtype_name(weight_dtype)
    try:  # the installed version, read without importing transformers (seconds)
        from importlib.metadata import version

        hf_cfg["transformers_version"] = version("transformers")
    except Exception:
        hf_cfg.setdefault("transformers_version", "4.45.0")
    with atomic_directory(out) as tmp:
        tok = tokenizer_files.export_tokenizer(model_dir, tmp, cfg, hf_cfg)
        (tmp / HF_CONFIG).write_text(json.dumps(dict(sorted(hf_cfg.items())), indent=2, ensure_ascii=False) + "\n")
        if cfg.causal:
            gen = dict(record.get("generation_config") or {})
            for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                if hf_cfg.get(key) is not None:
                    gen.setdefault(key, hf_cfg[key])
            gen["transformers_version"] = hf_cfg["transformers_version"]
            (tmp / HF_GENERATION_CONFIG).write_text(json.dumps(gen, indent=2) + "\n")
        files = save_weights(hf_sd, tmp, max_shard_bytes or DEFAULT_SHARD_BYTES)
    return {"family": fam.name, "architecture": arch, "out": str(out), "files": files,
            "dtype": hf_cfg["torch_dtype"], "tokenizer": tok,
            "params": sum(v.numel() for v in hf_sd.values())}


def export_reward_hf(model_dir: str | os.PathLike, out: str | os.PathLike, dtype: str | None = None
                     ) -> dict[str, Any]:
    """Write a reward model dir as HF ``<Family>ForSequenceClassification`` (``num_labels=1``): the
    backbone under the family's base-model prefix, ``score.weight``, and the tokenizer files."""
    model_dir, out = Path(model_dir), Path(out)
    _check_out(model_dir, out)
    info = read_metadata(model_dir)
    cfg = info.model_config()
    record = info.hf
    fam = FAMILIES[record["family"]] if record.get("family") in FAMILIES else family_for_model_config(cfg)
    if fam.name not in ("llama", "mistral", "qwen2"):
        raise UserError(f"reward models export as Llama/Mistral/Qwen2 sequence classifiers; '{model_dir}' maps to "
                        f"{fam.name}")
    sd = load_weights(model_dir)
    score = sd.pop("score.weight")
    if cfg.tie_embeddings:
        sd.pop("output.weight", None)
    if dtype is not None:
        if dtype not in DTYPES:
            raise UserError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
        sd = {k: v.to(DTYPES[dtype]) for k, v in sd.items()}
        score = score.to(DTYPES[dtype])
    if cfg.lm_head and not cfg.tie_embeddings:
        sd.setdefault("output.weight", torch.zeros(cfg.vocab_size, cfg.dim, dtype=score.dtype))
    hf_sd = lmforge_to_hf_state_dict(fam, cfg, sd)
    hf_sd = {k: v for k, v in hf_sd.items() if not k.startswith("lm_head.")}
    hf_sd["score.weight"] = score.contiguous()
    base = dict(record.get("config") or {}) if record.get("family") == fam.name else {}
    hf_cfg = model_config_to_hf(cfg, fam, base)
    arch = {"llama": "LlamaForSequenceClassification", "mistral": "MistralForSequenceClassification",
            "qwen2": "Qwen2ForSequenceClassification"}[fam.name]
    hf_cfg.update(architectures=[arch], num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0},
                  problem_type="regression")
    hf_cfg.pop("dtype", None)
    hf_cfg["torch_dtype"] = _hf_dtype_name(score.dtype)
    with atomic_directory(out) as tmp:
        tok_info = tokenizer_files.export_tokenizer(model_dir, tmp, cfg, hf_cfg)  # fills *_token_id
        if hf_cfg.get("pad_token_id") is None:  # HF reads the score at the last token that is not pad_token_id
            hf_cfg["pad_token_id"] = hf_cfg.get("eos_token_id")
        (tmp / "config.json").write_text(json.dumps(dict(sorted(hf_cfg.items())), indent=2) + "\n")
        files = save_weights(hf_sd, tmp)
    return {"family": fam.name, "architecture": arch, "out": str(out), "files": files,
            "dtype": hf_cfg["torch_dtype"], "tokenizer": tok_info, "params": sum(v.numel() for v in hf_sd.values())}


def _export_architecture(fam: Family, base: dict[str, Any], heads: dict[str, torch.Tensor]) -> str:
    archs = base.get("architectures") or []
    if fam.name == "bert":
        has_mlm = any(k.startswith("mlm.") for k in heads)
        if has_mlm:
            return "BertForMaskedLM"
        return "BertModel"
    if fam.name != "gpt2" and archs and archs[0] in fam.architectures:
        return archs[0]
    return fam.architectures[0]  # GPT2Model checkpoints come back as GPT2LMHeadModel (tied head)
