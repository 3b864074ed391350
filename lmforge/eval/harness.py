"""lmforge model dirs in EleutherAI's lm-evaluation-harness: the ``lmforge`` model type.

    python -m lmforge.eval.harness --model lmforge --model_args path=RUN/model --tasks hellaswag
    lmforge-lm-eval --model lmforge --model_args path=RUN/model,batch_size=16 --tasks mmlu

lm-eval 0.4.13 finds models only in its registry and reads no plugin entry points, so ``lm_eval --model
lmforge`` needs the registration to run first: this module registers the class on import and, run as a
program, hands its arguments to lm-eval's own CLI (same flags, same output). From Python::

    import lmforge.eval.harness  # registers "lmforge"
    lm_eval.simple_evaluate(model="lmforge", model_args="path=RUN/model", tasks=[...])

Model arguments (``--model_args k=v,...``): ``path`` (the model dir; required), ``batch_size`` (8),
``device`` (cuda if available, else cpu), ``dtype`` (auto: bfloat16 on CUDA, float32 on CPU),
``max_length`` (the model's context), ``max_gen_toks`` (256), ``add_bos_token`` (default: whether the
model's chat template starts with BOS, the way the tokenizer was trained to be used), ``seed`` (sampling).

Scoring follows ``lm_eval.models.huggingface.HFLM``: the same context/continuation split
(``TemplateLM._encode_pair``), left truncation to ``max_length + 1`` tokens, rolling windows for
``loglikelihood_rolling``, greedy decoding cut at the ``until`` strings and EOS for ``generate_until``; so the
scores equal ``--model hf`` on the same model exported with ``lmforge export --format hf``.
"""

from __future__ import annotations

import sys

import torch

from lmforge.artifacts.identity import check_model_dir_tokenizer
from lmforge.config import UserError
from lmforge.eval.choice import score_continuations
from lmforge.eval.loading import load_for_eval
from lmforge.generate.engine import GenerationConfig, cut_at_stop, generate_ids
from lmforge.tokenizer.chat_template import get_chat_template, render_chat, uses_bos

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # an optional extra
    raise ImportError("lm-evaluation-harness is not installed; pip install 'lmforge[harness]'") from e


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise UserError(f"model_args {name}={value!r} is not a boolean; use true or false")


@register_model("lmforge")
class LMForgeLM(TemplateLM):
    """An lmforge model dir (plain LM or LoRA adapter dir) behind lm-eval's three request types, batched."""

    def __init__(self, path: str | None = None, pretrained: str | None = None, batch_size: int | str = 8,
                 device: str | None = None, dtype: str = "auto", max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token=None, seed: int = 0, max_batch_size=None, **unknown):
        super().__init__()

        if unknown:
            raise UserError(f"model_args {', '.join(sorted(unknown))} not understood by the lmforge model; it takes "
                            "path, device, dtype, max_length, max_gen_toks, add_bos_token, seed")
        path = path or pretrained
        if not path:
            raise UserError("--model_args needs path=MODEL_DIR (an lmforge model dir)")
        if str(batch_size).startswith("auto"):
            batch_size = 8  # no automatic search: a fixed, reproducible default
        self._batch_size = int(batch_size)
        if self._batch_size <= 0:
            raise UserError(f"batch_size={batch_size} must be positive")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        elif dtype in ("float32", "bfloat16", "float16"):
            torch_dtype = getattr(torch, dtype)
        else:
            raise UserError(f"model_args dtype={dtype} is not one of auto, float32, bfloat16, float16")
        check_model_dir_tokenizer(path)
        model, tokenizer, labels = load_for_eval(path, device, torch_dtype)
        if labels is not None or not model.cfg.causal or not model.cfg.lm_head:
            raise UserError(f"'{path}' is not a causal language model; lm-eval scores language models")
        self.model, self.tokenizer_lm = model, tokenizer
        self._device = torch.device(device)
        self._max_length = int(max_length) if max_length else model.cfg.max_seq_len
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = uses_bos(tokenizer) if add_bos_token is None else _flag(add_bos_token, "add_bos_token")
        self.seed = int(seed)
        self.path = str(path)

    # ---- what TemplateLM needs ------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer_lm.eos_id
        return eos if eos is not None else self.prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        tok = self.tokenizer_lm
        return tok.bos_id if tok.bos_id is not None else tok.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The model's chat template (for ``--apply_chat_template``), or None when not asked for."""
        if chat_template is False or chat_template is None:
            return None

        return get_chat_template(self.tokenizer_lm)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The conversation rendered with the tokenizer's chat template (lmforge's sandboxed Jinja renderer)."""
        return render_chat(self.tokenizer_lm, chat_history, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add = self.add_bos_token if add_special_tokens is None else add_special_tokens
        ids = self.tokenizer_lm.encode(string)
        bos = self.tokenizer_lm.bos_id
        if add and bos is not None and ids[:1] != [bos]:
            ids = [bos, *ids]
        return ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer_lm.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = score_continuations(self.model, [(ctx, cont) for _, ctx, cont in requests], self._batch_size,
                                  self._max_length)
        for (key, _, _), answer in zip(requests, out):
            if key is not None and key[0] is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for w in get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                               max_seq_len=self._max_length, context_len=1):
                ctx, cont = make_disjoint_window(w)
                windows.append(((None,), ctx, cont))
                owner.append(n)
        scores = self._loglikelihood_tokens(windows)
        totals = [0.0] * len(requests)
        for n, (ll, _) in zip(owner, scores):
            totals[n] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # requests with the same settings decode together
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        for batch_no, idx in enumerate(groups.values()):
            kwargs = dict(requests[idx[0]].args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            if eos_text and eos_text not in until:
                until.append(eos_text)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            sample = _flag(kwargs.pop("do_sample", False), "do_sample")
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not sample:
                temperature = 0.0
            elif temperature == 0.0:
                temperature = 1.0
            keep = self._max_length - max_new
            prompts = {i: self.tok_encode(requests[i].args[0])[-keep:] if keep > 0 else [self.prefix_token_id]
                       for i in idx}
            order = sorted(idx, key=lambda i: (-len(prompts[i]), i))
            for start in range(0, len(order), self._batch_size):
                chunk = order[start:start + self._batch_size]
                gen = GenerationConfig(max_new_tokens=max_new, temperature=temperature, top_k=kwargs.get("top_k"),
                                       top_p=kwargs.get("top_p"), seed=self.seed * 100_003 + batch_no * 1_000 + start,
                                       eos_id=self.tokenizer_lm.eos_id, stop_strings=tuple(s for s in until if s))
                new = generate_ids(self.model, [prompts[i] or [self.prefix_token_id] for i in chunk], gen,
                                   self.tokenizer_lm)
                for i, ids in zip(chunk, new):
                    text = cut_at_stop(self.tok_decode(ids), [s for s in until if s])
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results


def main(argv: list[str] | None = None) -> None:
    """``python -m lmforge.eval.harness ...`` / ``lmforge-lm-eval ...``: lm-eval's CLI with ``lmforge`` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
