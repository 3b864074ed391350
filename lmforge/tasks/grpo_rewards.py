"""Reward functions of online RL (``finetune.mode: grpo``): a small registry and their weighted sum.

Every reward function has the batched signature TRL uses, so a function written for TRL's ``GRPOTrainer``
runs here unchanged:

    fn(prompts: list[str], completions: list[str], *, answer: list[str | None], completion_ids: list[list[int]],
       **kwargs) -> list[float | None]

(one value per completion; None = "no opinion": it adds nothing to the sum and is left out of the
function's own mean). ``grpo.rewards`` lists ``{name, weight, ...}`` entries (`RewardSpec`):

    answer     the completion's answer equals the record's ``answer`` -> 1, else 0. The answer is the content
               of the last ``\\boxed{...}`` when there is one, else (numeric) the last number of the text,
               else the stripped text. ``mode: auto`` compares as numbers when both sides are numbers
               (within ``tolerance``, relative for large values), as normalised text otherwise;
               ``exact`` / ``numeric`` force one. The default when ``grpo.rewards`` is left out.
    format     1 when the regex ``pattern`` matches the completion (``re.search``; ``full: true`` for the
               whole text), else 0 — e.g. ``"<think>.*</think>"`` with DOTALL implied.
    length     a length penalty: ``−max(0, tokens − target_tokens) / max_completion_length`` (in [−1, 0]).
    python     the user's own function ``function: FILE.py:NAME`` (a file path; loaded once at the start).

Trust model: a ``python`` reward runs the user's own code, with the user's rights, exactly as a Python file
named in a config would — lmforge loads the file the config names and nothing else. Model output is only
ever *data*: the built-in rewards parse it with regexes and ``float()``, never ``eval``/``exec`` it, and a
user function receives it as strings. Do not point ``function:`` at a file you did not write or review.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError

BUILTIN_REWARDS = ("answer", "format", "length", "python")
RewardFn = Callable[..., list]

_BOXED = re.compile(r"\\boxed\s*\{")
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


# ================================================================================================
# Answer extraction and comparison
# ================================================================================================
def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unclosed: no answer


def last_number(text: str) -> float | None:
    """The last number in ``text`` (thousands commas allowed: ``1,234.5``), or None."""
    found = _NUMBER.findall(text)
    for s in reversed(found):
        try:
            return float(s.replace(",", ""))
        except ValueError:
            continue
    return None


def as_number(text: str) -> float | None:
    """``text`` as one number (``1,000``, ``-3.5``, ``1e3``, a trailing ``.``/``%`` ignored), or None."""
    s = text.strip().rstrip(".%").replace(",", "").replace("$", "")
    if not _NUMBER.fullmatch(s or "x"):
        return None
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def normalize(text: str) -> str:
    """Text compared by exact match: stripped, lower-cased, inner whitespace collapsed, a final ``.`` dropped."""
    return " ".join(text.strip().lower().split()).rstrip(".").strip()


def extract_answer(completion: str, mode: str = "auto") -> str | float | None:
    """The answer a completion gives: ``\\boxed{}`` first; then, for ``numeric`` (and ``auto``) the last
    number; ``exact`` (and ``auto`` without a number) the whole stripped text."""
    b = boxed(completion)
    if b is not None:
        if mode == "exact":
            return b
        n = as_number(b)
        return n if n is not None else (None if mode == "numeric" else b)
    if mode in ("numeric", "auto"):
        n = last_number(completion)
        if n is not None or mode == "numeric":
            return n
    return completion


def answer_matches(completion: str, answer: Any, mode: str = "auto", tolerance: float = 1e-6) -> bool:
    """True when the completion's answer (`extract_answer`) equals ``answer``."""
    if answer is None:
        return False
    want_num = as_number(str(answer)) if mode != "exact" else None
    if mode == "numeric" and want_num is None:
        return False
    got = extract_answer(completion, "numeric" if (mode == "auto" and want_num is not None) else
                         ("exact" if mode == "auto" else mode))
    if got is None:
        return False
    if want_num is not None and isinstance(got, float):
        return abs(got - want_num) <= tolerance * max(1.0, abs(want_num))
    return normalize(str(got)) == normalize(str(answer))


# ================================================================================================
# The built-in reward functions (batched, TRL's signature)
# ================================================================================================
def answer_reward(mode: str = "auto", tolerance: float = 1e-6) -> RewardFn:
    def answer(prompts, completions, *, answer, **kwargs):
        return [1.0 if answer_matches(c, a, mode, tolerance) else 0.0 for c, a in zip(completions, answer)]

    return answer


def format_reward(pattern: str, full: bool = False) -> RewardFn:
    try:
        rx = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise ConfigError(f"grpo.rewards: format pattern {pattern!r} is not a valid regex ({e})") from None
    match = rx.fullmatch if full else rx.search

    def format_match(prompts, completions, **kwargs):
        return [1.0 if match(c) else 0.0 for c in completions]

    return format_match


def length_reward(target_tokens: int, max_completion_length: int) -> RewardFn:
    def length(prompts, completions, *, completion_ids, **kwargs):
        return [-max(0, len(ids) - target_tokens) / max(1, max_completion_length) for ids in completion_ids]

    return length


def load_user_function(ref: str) -> RewardFn:
    """``FILE.py:NAME`` (the file relative to the working directory) -> the callable ``NAME`` defined in it.
    This runs the user's own file (see the module docstring's trust model); only a file path is accepted, so
    what runs is exactly the file the config names."""
    target, sep, name = ref.rpartition(":")
    if not sep or not target.endswith(".py") or not name.isidentifier():
        raise ConfigError(f"grpo.rewards: function={ref!r} must be FILE.py:NAME (a Python file of yours and the "
                          "function in it)")
    path = Path(target)
    if not path.is_file():
        raise ConfigError(f"grpo.rewards: function={ref!r}: no file {path}; give the path of your reward file "
                          "(relative to the working directory)")
    mod_name = f"lmforge_user_reward_{path.stem}_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and relative lookups inside the user's file work
    spec.loader.exec_module(module)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"grpo.rewards: function={ref!r}: {path} has no function {name}")
    return fn


# ================================================================================================
# The weighted combination
# ================================================================================================
@dataclass
class Reward:
    name: str  # the metric name: rewards/<name>
    weight: float
    fn: RewardFn


def build_rewards(specs: Sequence[Any], max_completion_length: int) -> list[Reward]:
    """`RewardSpec` entries (``grpo.rewards``) -> named, weighted functions; repeated names get ``_2``, ``_3``."""
    out: list[Reward] = []
    seen: dict[str, int] = {}
    for i, s in enumerate(specs):
        if s.name == "answer":
            fn, label = answer_reward(s.mode, s.tolerance), "answer"
        elif s.name == "format":
            if not s.pattern:
                raise ConfigError(f"grpo.rewards[{i}]: name=format needs pattern: REGEX")
            fn, label = format_reward(s.pattern, s.full), "format"
        elif s.name == "length":
            fn, label = length_reward(s.target_tokens, max_completion_length), "length"
        elif s.name == "python":
            if not s.function:
                raise ConfigError(f"grpo.rewards[{i}]: name=python needs function: FILE.py:NAME")
            fn = load_user_function(s.function)
            label = s.function.rpartition(":")[2]
        else:
            raise ConfigError(f"grpo.rewards[{i}]: name={s.name} is not one of {', '.join(BUILTIN_REWARDS)}")
        seen[label] = seen.get(label, 0) + 1
        out.append(Reward(label if seen[label] == 1 else f"{label}_{seen[label]}", float(s.weight), fn))
    return out


def score(rewards: Sequence[Reward], prompts: list[str], completions: list[str], answers: list[Any],
          completion_ids: list[list[int]]) -> tuple[list[float], dict[str, list[float | None]]]:
    """(the weighted sum per completion, each function's raw values). A function must return one number
    (or None) per completion; anything else is refused naming it."""
    total = [0.0] * len(completions)
    per: dict[str, list[float | None]] = {}
    for r in rewards:
        values = r.fn(prompts=prompts, completions=completions, answer=answers, completion_ids=completion_ids)
        values = list(values) if values is not None else []
        if len(values) != len(completions):
            raise ValueError(f"reward '{r.name}' returned {len(values)} values for {len(completions)} completions")
        clean: list[float | None] = []
        for v in values:
            if v is None:
                clean.append(None)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise ValueError(f"reward '{r.name}' returned {v!r}; a reward is a finite number or None")
            clean.append(float(v))
        per[r.name] = clean
        for j, v in enumerate(clean):
            if v is not None:
                total[j] += r.weight * v
    return total, per


__all__ = ["BUILTIN_REWARDS", "Reward", "answer_matches", "boxed", "build_rewards", "extract_answer",
           "last_number", "load_user_function", "score"]
