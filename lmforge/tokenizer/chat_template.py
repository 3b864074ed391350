"""Chat templates: Jinja, rendered in jinja2's immutable sandbox, and encoding with assistant-only labels.

A template sees ``messages`` (``[{role, content}]``), ``add_generation_prompt``, ``bos_token`` and
``eos_token`` — the variables Hugging Face chat templates use, so an imported model's template renders
the same way (``raise_exception`` and the loop-control extension are provided too). It is configurable:
pass a template string or a ``.jinja`` file, or store one with the tokenizer as ``chat_template.jinja``
(`save_chat_template`) so model dirs and exports carry it.

The default template uses the tokenizer's role tokens — lmforge's ``<|system|>`` / ``<|user|>`` /
``<|assistant|>`` … ``<|end|>`` (`lmforge.tokenizer.core.DEFAULT_CHAT_TEMPLATE`) or ChatML — and falls back to
plain-text headers for a tokenizer without them. In training every assistant turn ends with EOS (appended
when the template does not write it), so generation stops.

The tokenizer is duck-typed: ``encode(text) -> ids``, ``decode(ids)``, ``eos_id``, ``bos_id``,
``special_tokens`` (mapping token -> id, or a list of tokens) and optionally ``chat_template``.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lmforge.config import ConfigError, atomic_write_text
from lmforge.tokenizer.core import DEFAULT_CHAT_TEMPLATE

IGNORE_INDEX = -100
TEMPLATE_FILE = "chat_template.jinja"


# ---- the sandbox ----------------------------------------------------------------------------------
RENDER_SECONDS = 5.0  # one rendering; a real chat template takes well under a millisecond
RENDER_MAX_CHARS = 4 << 20  # output (and any string/list a template builds) above this is refused
_RANGE_CHECK_EVERY = 1024


class TemplateLimitError(ConfigError):
    """A chat template ran past `RENDER_SECONDS` or built more than `RENDER_MAX_CHARS`: a broken template,
    whatever the conversation (callers that tolerate a template refusing a conversation re-raise this)."""


class _Budget(threading.local):
    deadline: float | None = None
    seconds: float = RENDER_SECONDS
    max_chars: int = RENDER_MAX_CHARS
    name: str = ""


_budget = _Budget()
_ORIGINS: dict[str, str] = {}  # template text -> the file it was read from (named in limit errors)


def _over(what: str):
    name = f" {_budget.name}" if _budget.name else ""
    return TemplateLimitError(f"chat template{name} {what}; a chat template must render a conversation in under "
                              f"{_budget.seconds:g} s and {_budget.max_chars:,} characters — fix its loops")


def _check_time() -> None:
    if _budget.deadline is not None and time.monotonic() > _budget.deadline:
        raise _over(f"did not finish rendering within {_budget.seconds:g} s (the limit)")


def _check_size(n: int, what: str) -> None:
    if n > _budget.max_chars:
        raise _over(f"{what} of size {n:,} (limit {_budget.max_chars:,})")


def _guard_iter(iterable):
    """Every ``{% for %}`` loop of a template iterates through this (the parser wraps each loop's iterable),
    as do generators that filters return: the clock is checked at every step, so loops nested over a long
    string stop at the time limit, and the strings one iteration yields are counted against the size limit."""
    _check_time()
    if isinstance(iterable, _Guarded):
        return iterable
    return _Guarded(iterable)


class _Guarded:
    __slots__ = ("_chars", "_it")

    def __init__(self, iterable) -> None:
        self._it = iter(iterable)
        self._chars = 0

    def __iter__(self):
        return self

    def __next__(self):
        _check_time()
        item = next(self._it)
        if isinstance(item, (str, list, tuple)):
            self._chars += len(item)
            _check_size(self._chars, "iterated over values")
        return item


def _guarded_range(*args):
    """`range` for templates: bounded like the output and checking the clock while it is iterated."""
    r = range(*args)
    _check_size(len(r), "asked for a range")
    return _Guarded(r)


_WIDTH = re.compile(r"\d+")


def _check_format(fmt: object) -> None:
    """A ``%`` / ``format`` string whose width or precision alone exceeds the size limit."""
    if isinstance(fmt, str) and len(fmt) <= _budget.max_chars:
        widest = max((int(m) for m in _WIDTH.findall(fmt) if len(m) < 12), default=0)
        if any(len(m) >= 12 for m in _WIDTH.findall(fmt)) or widest > _budget.max_chars:
            raise _over("formats a field wider than the size limit")


def _total(items) -> int:
    return sum(len(x) for x in items if isinstance(x, (str, list, tuple)))


def _materialize(value):
    """A sequence a filter or method is about to join / sum, as a list read under the clock and size guard."""
    if isinstance(value, (list, tuple)):
        return value
    if isinstance(value, (str, dict)) or not hasattr(value, "__iter__"):
        return value
    out = []
    for item in _guard_iter(value):
        out.append(item)
        _check_size(len(out), "iterated over values")
    return out


def _precheck(name: str, target, args: tuple, kwargs: dict) -> tuple:
    """Refuse, before it runs, a filter or string method whose result would exceed the size limit although
    its inputs do not (``replace``, ``join``, ``indent``, ``expandtabs``, ``sum``, ``wordwrap``, ``format``,
    ``%``). Returns ``args`` with an iterable to be joined or summed read into a list (checked)."""
    if name == "replace" and isinstance(target, str) and len(args) >= 2 and isinstance(args[1], str):
        old, new = args[0], args[1]
        if isinstance(old, str):
            n = len(target) + 1 if old == "" else target.count(old)
            _check_size(len(target) + n * len(new), "replaces into a string")
    elif name == "join":
        if isinstance(target, str):  # str.join(seq)
            args = (_materialize(args[0]), *args[1:]) if args else args
            seq, sep = (args[0] if args else []), target
        else:  # the join filter: seq|join(d)
            seq, sep = target, (args[0] if args else kwargs.get("d", ""))
        if isinstance(seq, (list, tuple)) and isinstance(sep, str):
            _check_size(_total(seq) + len(sep) * max(len(seq) - 1, 0), "joins a string")
    elif name == "sum" and isinstance(target, (list, tuple)):
        _check_size(_total(target), "sums a sequence")
    elif name == "indent" and isinstance(target, str):
        width = args[0] if args else kwargs.get("width", 4)
        w = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        _check_size(len(target) + (target.count("\n") + 1) * w, "indents a string")
    elif name == "expandtabs" and isinstance(target, str):
        n = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(n, int):
            _check_size(len(target) + target.count("\t") * n, "expands tabs")
    elif name == "wordwrap" and isinstance(target, str):
        wrap = kwargs.get("wrapstring", args[3] if len(args) > 3 else None)
        if isinstance(wrap, str):
            _check_size(len(target) * (1 + len(wrap)), "wraps a string")
    elif name in ("format", "format_map"):
        _check_format(target)
    return args


def _check_args(args, kwargs) -> None:
    _check_time()
    for v in (*args, *kwargs.values()):
        if isinstance(v, int) and not isinstance(v, bool):
            _check_size(v, "passes a number")
        elif isinstance(v, str):
            _check_size(len(v), "passes a string")


def _sized(value):
    """``value``, unless it is a string or list longer than the output limit (a template doubling a
    string in a loop is caught when it reads the string back); an iterator comes back guarded."""
    if isinstance(value, (str, list, tuple)):
        _check_size(len(value), "built a value")
    elif isinstance(value, Iterator) and not isinstance(value, _Guarded):
        return _Guarded(value)
    return value


def _guarded_filter(name: str, f):
    from jinja2.utils import _PassArg

    skip = 0 if _PassArg.from_obj(f) is None else 1  # the context / environment jinja passes first

    @functools.wraps(f)  # keeps jinja's pass_context / pass_environment marks
    def guarded(*args, **kwargs):
        user = args[skip:]
        _check_args(user, kwargs)
        if user:
            target = _materialize(user[0]) if name in ("join", "sum") else user[0]
            args = (*args[:skip], target, *_precheck(name, target, user[1:], kwargs))
        return _sized(f(*args, **kwargs))

    return guarded


def _guarded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100):
    _check_size(n * max * 16, "asked for lorem ipsum")
    from jinja2.utils import generate_lorem_ipsum

    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _sandbox_class():
    from jinja2 import nodes
    from jinja2.runtime import LoopContext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    guard_name = f"{__name__}._guard_iter"

    class GuardedSandbox(ImmutableSandboxedEnvironment):
        """The immutable sandbox plus a clock and a size limit checked at every loop step, call, attribute and
        item access and repetition operator, so a template that loops or allocates without bound stops."""

        intercepted_binops = frozenset(["*", "**", "+", "%"])

        def _parse(self, source, name, filename):
            tree = super()._parse(source, name, filename)
            for loop in tree.find_all(nodes.For):  # `for x in ITER` -> `for x in _guard_iter(ITER)`
                loop.iter = nodes.Call(nodes.ImportedName(guard_name, lineno=loop.lineno), [loop.iter], [],
                                       None, None, lineno=loop.lineno)
            return tree

        def call_binop(self, context, operator, left, right):
            _check_time()
            if operator == "**" and isinstance(right, int) and right > 64 and left not in (0, 1, -1):
                raise _over(f"raises a number to the power {right}")
            seqs = (str, list, tuple)
            if operator == "+" and isinstance(left, seqs) and isinstance(right, seqs):
                _check_size(len(left) + len(right), "builds a sequence")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        _check_size(len(seq) * n, "builds a repetition")
                        if isinstance(seq, (list, tuple)):
                            _check_size(_total(seq) * n, "builds a repetition")
            if operator == "%":
                _check_format(left)
            return _sized(super().call_binop(context, operator, left, right))

        def call(self, context, obj, /, *args, **kwargs):
            _check_args(args, kwargs)
            if isinstance(obj, LoopContext) and args:  # a recursive loop's `loop(children)`
                args = (_Guarded(args[0]), *args[1:])
            owner = getattr(obj, "__self__", None)
            if isinstance(owner, str):  # a string method: refuse one that would blow up the size
                args = _precheck(getattr(obj, "__name__", ""), owner, args, kwargs)
            return _sized(super().call(context, obj, *args, **kwargs))

        def wrap_str_format(self, value):  # `'{:>N}'.format` is wrapped when it is looked up
            if getattr(value, "__name__", None) in ("format", "format_map"):
                _check_format(getattr(value, "__self__", None))
            return super().wrap_str_format(value)

        def getattr(self, obj, attribute):
            _check_time()
            return _sized(super().getattr(obj, attribute))

        def getitem(self, obj, argument):
            _check_time()
            return _sized(super().getitem(obj, argument))

    return GuardedSandbox


@functools.lru_cache(maxsize=32)
def _compile(template: str):
    from jinja2 import TemplateError

    def raise_exception(message: str):
        raise ConfigError(f"chat template: {message}")

    env = _sandbox_class()(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["range"] = _guarded_range
    env.globals["lipsum"] = _guarded_lipsum
    env.filters = {name: _guarded_filter(name, f) for name, f in env.filters.items()}
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise ConfigError(f"chat template does not compile: {e}; fix the Jinja syntax") from None


def template_name(tokenizer=None, template: str | None = None) -> str:
    """How limit errors name a template: the file it was read from, or the tokenizer dir it came with."""
    if template is not None and template in _ORIGINS:
        return f"'{_ORIGINS[template]}'"
    stored = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    where = getattr(tokenizer, "path", None) if tokenizer is not None else None
    if where and (template is None or template == stored):
        f = Path(str(where)) / TEMPLATE_FILE
        return f"'{f}'" if f.is_file() else f"of the tokenizer in '{where}'"
    return ""


def render(template: str, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False,
           bos_token: str = "", eos_token: str = "", *, name: str | None = None, **extra: Any) -> str:
    """Render ``messages`` with a Jinja chat template in the immutable sandbox (no attribute writes,
    no access to Python internals), within `RENDER_SECONDS` and `RENDER_MAX_CHARS`: a template that loops
    or allocates without bound fails with a one-line `TemplateLimitError` naming it (``name``: how, e.g.
    its file; default: the file it was read from, if known) instead of hanging."""
    from jinja2 import TemplateError

    outer, outer_name = _budget.deadline, _budget.name
    _budget.name = name if name is not None else template_name(None, template) if outer is None else outer_name
    try:
        compiled = _compile(template)
    except ConfigError:
        _budget.name = outer_name
        raise
    _budget.deadline = time.monotonic() + _budget.seconds if outer is None else outer
    size, parts = 0, []
    try:
        for chunk in compiled.generate(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                       bos_token=bos_token, eos_token=eos_token, **extra):
            size += len(chunk)
            _check_size(size, "wrote an output")
            _check_time()
            parts.append(chunk)
    except ConfigError:
        raise
    except TemplateError as e:
        raise ConfigError(f"chat template failed to render: {e}") from None
    except RecursionError:
        raise ConfigError("chat template recursed without end; fix its macros") from None
    except (MemoryError, OverflowError) as e:
        raise _over(f"allocated without bound ({type(e).__name__})") from None
    finally:
        _budget.deadline, _budget.name = outer, outer_name
    return "".join(parts)


# ---- tokenizer access ----------------------------------------------------------------------------
def special_token_strings(tokenizer) -> dict[str, int | None]:
    """The tokenizer's special tokens as {token: id (or None when unknown)}."""
    st = getattr(tokenizer, "special_tokens", None) or {}
    if callable(st):
        st = st()
    if isinstance(st, dict):
        if all(isinstance(k, str) for k in st):
            return {k: (v if isinstance(v, int) else None) for k, v in st.items()}
        return {v: k for k, v in st.items() if isinstance(v, str)}
    return {t: None for t in st if isinstance(t, str)}


def _token_text(tokenizer, which: str) -> str:
    """The text of the BOS / EOS token ("" when the tokenizer has none)."""
    text = getattr(tokenizer, f"{which}_token", None)
    if isinstance(text, str) and text:
        return text
    tid = getattr(tokenizer, f"{which}_id", None)
    if tid is None:
        return ""
    for tok, i in special_token_strings(tokenizer).items():
        if i == tid:
            return tok
    return ""


def token_texts(tokenizer) -> tuple[str, str]:
    return _token_text(tokenizer, "bos"), _token_text(tokenizer, "eos")


def encode_text(tokenizer, text: str) -> list[int]:
    """``tokenizer.encode`` without automatically added BOS / EOS (the template places those)."""
    if not text:
        return []
    ids = list(tokenizer.encode(text))
    bos, eos = getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)
    bos_text, eos_text = token_texts(tokenizer)
    if bos is not None:
        lead = next((i for i, t in enumerate(ids) if t != bos), len(ids))
        written = 1 if bos_text and text.startswith(bos_text) else 0
        if lead > written:
            ids = ids[lead - written:]
    if eos is not None and ids and ids[-1] == eos and not (eos_text and text.endswith(eos_text)):
        ids = ids[:-1]
    return ids


# ---- templates -----------------------------------------------------------------------------------
_PLAIN_HEADERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}


def _jinja_str(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def default_chat_template(tokenizer=None) -> str:
    """The template for the tokenizer's role tokens: lmforge's own (``<|user|>`` … ``<|end|>``, the one
    `lmforge tokenizer train` stores), ChatML (``<|im_start|>`` / ``<|im_end|>``), or plain-text headers."""
    specials = set(special_token_strings(tokenizer)) if tokenizer is not None else set()
    if {"<|user|>", "<|assistant|>", "<|end|>"} <= specials:
        return DEFAULT_CHAT_TEMPLATE
    if {"<|im_start|>", "<|im_end|>"} <= specials:
        heads = {r: f"<|im_start|>{r}\n" for r in ("system", "user", "assistant")}
        end = "<|im_end|>\n"
    else:
        heads = dict(_PLAIN_HEADERS)
        end = "\n\n"
    parts = ["{{ bos_token }}{% for message in messages %}"]
    for i, role in enumerate(("system", "user", "assistant")):
        kw = "if" if i == 0 else "elif"
        eos = " + eos_token" if role == "assistant" else ""
        parts.append(f"{{% {kw} message['role'] == '{role}' %}}"
                     f"{{{{ {_jinja_str(heads[role])} + message['content']{eos} + {_jinja_str(end)} }}}}")
    parts.append("{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}{% endfor %}")
    parts.append(f"{{% if add_generation_prompt %}}{{{{ {_jinja_str(heads['assistant'])} }}}}{{% endif %}}")
    return "".join(parts)


def get_chat_template(tokenizer=None, template: str | os.PathLike | None = None) -> str:
    """The template to use: ``template`` (Jinja text or a file path), else the tokenizer's stored one,
    else the default for its role tokens."""
    if template is not None:
        t = str(template)
        if "{" not in t and (t.endswith(".jinja") or os.path.sep in t or Path(t).is_file()):
            p = Path(t)
            if not p.is_file():
                raise ConfigError(f"chat template file '{t}' does not exist; pass a .jinja file or template text")
            text = p.read_text(encoding="utf-8")
            if len(_ORIGINS) > 64:
                _ORIGINS.clear()
            _ORIGINS[text] = t
            return text
        return t
    stored = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(stored, str) and stored.strip():
        return stored
    return default_chat_template(tokenizer)


def save_chat_template(template: str, directory: str | os.PathLike) -> Path:
    """Store a template beside the tokenizer files (``chat_template.jinja``), checked to compile first."""
    _compile(template)
    path = Path(directory) / TEMPLATE_FILE
    atomic_write_text(path, template)
    return path


def render_chat(tokenizer, messages: Sequence[dict[str, str]], template: str | None = None,
                add_generation_prompt: bool = False) -> str:
    bos, eos = token_texts(tokenizer)
    text = get_chat_template(tokenizer, template)
    return render(text, messages, add_generation_prompt, bos, eos, name=template_name(tokenizer, text))


def render_generation_prompt(tokenizer, messages: Sequence[dict[str, str]], template: str | None = None) -> str:
    """The text a model continues to answer ``messages`` (the conversation + the assistant header)."""
    return render_chat(tokenizer, messages, template, add_generation_prompt=True)


# ---- encoding ------------------------------------------------------------------------------------
def _prefix(longer: str, shorter: str, what: str) -> str:
    if not longer.startswith(shorter):
        raise ConfigError(f"chat template is not incremental: rendering {what} changes the text before it; "
                          "assistant-only labels need a template whose output for messages[:i] is a prefix "
                          "of its output for messages[:i+1]")
    return longer[len(shorter):]


_CUT_MARGIN = 64  # tokens past max_len before an untrained stretch is cut: its last tokens may still merge


def encode_chat(tokenizer, messages: Sequence[dict[str, str]], template: str | None = None,
                max_len: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and labels that train only the assistant replies.

    ``labels[i] == input_ids[i]`` for tokens of an assistant reply and the EOS that ends it (EOS is
    appended when the template does not write it); every other label is ``IGNORE_INDEX``. Labels are
    aligned with the inputs (not shifted). Non-trained text is encoded in one piece per stretch, so the
    prompt of a single-turn conversation is token for token ``encode_prompt(messages[:-1])``.

    ``max_len`` (the caller keeps only the first ``max_len`` ids): the conversation is cut before the rest of
    it is rendered — encoding stops once more than ``max_len`` ids are out (so the result is still longer
    than ``max_len`` when the whole one would be), and a non-trained stretch that alone runs past
    ``max_len`` by a margin ends it. Rendering a prefix costs its length, so stopping early keeps a
    10,000-turn record from costing 10,000 ever-longer renders; the first ``max_len`` ids are those of the
    whole conversation.
    """
    template = get_chat_template(tokenizer, template)
    bos_text, eos_text = token_texts(tokenizer)
    eos_id = getattr(tokenizer, "eos_id", None)
    if eos_id is None:
        raise ConfigError("the tokenizer has no EOS token; SFT appends EOS after each assistant turn "
                          "so generation stops — train or load a tokenizer with one")

    name = template_name(tokenizer, template)

    def rend(msgs, gen=False):
        return render(template, msgs, gen, bos_text, eos_text, name=name)

    ids: list[int] = []
    labels: list[int] = []

    def emit(text: str, train: bool) -> None:
        new = encode_text(tokenizer, text)
        ids.extend(new)
        labels.extend(new if train else [IGNORE_INDEX] * len(new))

    done = rend([])
    pending = done
    checked = 0  # length of `pending` when it was last counted against max_len
    for i, msg in enumerate(messages):
        if max_len is not None and len(ids) > max_len:
            return ids, labels  # everything from here on lies past what the caller keeps
        if msg["role"] != "assistant":
            full = rend(messages[: i + 1])
            pending += _prefix(full, done, f"message {i}")
            done = full
            if max_len is not None and len(pending) > 2 * checked:  # counted at doublings: linear in total
                checked = len(pending)
                if len(ids) + len(encode_text(tokenizer, pending)) > max_len + _CUT_MARGIN:
                    emit(pending, train=False)  # the window ends inside this untrained stretch
                    return ids, labels
            continue
        header = rend(messages[:i], gen=True)
        pending += _prefix(header, done, f"the assistant header before message {i}")
        full = rend(messages[: i + 1])
        reply = _prefix(full, header, f"assistant message {i}")
        start = reply.find(msg["content"]) if msg["content"] else 0
        k = reply.find(eos_text, max(start, 0) + len(msg["content"])) if eos_text else -1
        emit(pending, train=False)
        checked = 0
        if k >= 0:  # the template wrote EOS: train through it; what follows belongs to the next prompt part
            emit(reply[:k], train=True)
            pending = reply[k + len(eos_text):]
        else:  # train the reply and its end-of-turn marker (e.g. <|end|>), then EOS; whitespace after waits
            body = reply.rstrip()
            emit(body, train=True)
            pending = reply[len(body):]
        ids.append(eos_id)
        labels.append(eos_id)
        done = full
    emit(pending, train=False)
    return ids, labels


def uses_bos(tokenizer, template: str | None = None) -> bool:
    """Whether the chat template starts a conversation with BOS (Llama-style) — then raw-text inputs
    (prompt/completion pairs, perplexity documents) start with BOS too."""
    bos_text, eos_text = token_texts(tokenizer)
    if not bos_text or getattr(tokenizer, "bos_id", None) is None:
        return False
    chosen = get_chat_template(tokenizer, template)
    try:
        text = render(chosen, [{"role": "user", "content": "x"}], False, bos_text, eos_text,
                      name=template_name(tokenizer, chosen))
    except TemplateLimitError:  # a template that hangs or blows up on one short turn is broken: say so now
        raise
    except ConfigError:  # a template that refuses a lone user turn: fall back to the tokenizer's habit
        return False
    return text.startswith(bos_text)


def encode_prompt(tokenizer, messages: Sequence[dict[str, str]], template: str | None = None) -> list[int]:
    """Token ids of the generation prompt for ``messages`` (what the model sees before answering)."""
    return encode_text(tokenizer, render_generation_prompt(tokenizer, messages, template))
