"""Chat templates are user input: one that loops or allocates without bound stops with a one-line error."""

from __future__ import annotations

import pytest

from lmforge.config import ConfigError
from lmforge.tokenizer import chat_template as ct

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.fixture(autouse=True)
def short_budget(monkeypatch):
    monkeypatch.setattr(ct._Budget, "seconds", 3.0)  # roomy: a loaded CI machine stalls a trivial render
    monkeypatch.setattr(ct._Budget, "max_chars", 100_000)


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(90000) %}{% for j in range(90000) %}{% endfor %}{% endfor %}", "within 3 s"),
    ("{% for m in messages %}{% for i in range(90000) %}{% for j in range(90000) %}{{ m.role[:0] }}"
     "{% endfor %}{% endfor %}{% endfor %}", "within 3 s"),
    ("{{ 'x' * 1000000000 }}", "repetition of size 1,000,000,000"),
    ("{{ [1] * 1000000000 }}", "repetition of size 1,000,000,000"),
    ("{{ 7 ** 100000000 }}", "power 100000000"),
    ("{{ 'x'|center(1000000000) }}", "passes a number of size 1,000,000,000"),
    ("{{ 'x'.ljust(1000000000) }}", "passes a number of size 1,000,000,000"),
    ("{% for i in range(10**12) %}{% endfor %}", "passes a number"),
    ("{% for i in range(90000) %}{{ 'abcdefghij' }}{% endfor %}", "wrote an output of size 100,0"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
     "{{ ns.s|length }}", "built a value"),
    ("{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     "builds a sequence"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed"),
])
def test_unbounded_templates_fail_with_one_line(template, message):
    with pytest.raises(ConfigError) as e:
        ct.render(template, CHAT)
    text = str(e.value)
    assert message in text and "\n" not in text
    assert "chat template" in text


def test_ordinary_templates_render_unchanged():
    # the limits leave real templates alone: loops, filters, concatenation and range all still work
    t = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' ~ m.content|trim }}"
         "{% if loop.last %}{{ eos_token }}{% endif %}{% endfor %}{% for i in range(3) %}{{ i }}{% endfor %}"
         "{{ messages|map(attribute='content')|join(',')|center(12) }}")
    assert ct.render(t, CHAT, bos_token="<s>", eos_token="</s>") == \
        "<s><|user|>hi<|assistant|>hello</s>012  hi,hello  "
    out = ct.render(ct.default_chat_template(None), CHAT, eos_token="</s>")
    assert out == "User: hi\n\nAssistant: hello</s>\n\n"


def test_the_budget_is_per_rendering():
    # one slow-ish rendering does not eat the next one's time: many renderings in a row all succeed
    for _ in range(200):
        assert ct.render("{% for i in range(2000) %}{% endfor %}ok", CHAT) == "ok"
    assert ct._budget.deadline is None
