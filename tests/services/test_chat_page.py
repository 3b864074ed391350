"""The chat page at `/` (lmforge/serve/static) in a real headless browser: Debian's Chromium driven by Selenium
against the real `lmforge serve` (a subprocess on 127.0.0.1, started with --api-key) over a tiny random model.

Greedy decoding (temperature 0) makes each reply a fixed function of the conversation, so what the page put
together from the streamed chunks is compared with the server's own non-streamed answer to the same request.
Without Chromium, chromedriver or selenium the tests skip — and fail under LMFORGE_REQUIRE_DATA=1 (CI)."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from _ports import free_port

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("LMFORGE_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("LMFORGE_CHROMEDRIVER", "/usr/bin/chromedriver")
API_KEY = "test-key-123"
WAIT_S = 120  # generous: the machine is shared
CHINESE = "你好，世界！今天天气很好"
# The model dir's chat template puts the messages' text one after another, without role headers, so the prompt
# ends with the user's last character; a tiny random model with tied embeddings greedily repeats its last input
# token, so the reply to CHINESE is Chinese ("好好好…"), to English text English.
ECHO_TEMPLATE = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
# English and Chinese lines: the tokenizer learns whole Chinese characters and words as tokens.
CORPUS = ([f"the {a} cat sat on the {b} mat and looked at the {c} dog" for a in ("red", "big", "old")
           for b in ("blue", "small", "warm") for c in ("tall", "quiet", "happy")]
          + ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
             "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。", "今天天气很好，我们去公园散步吧。",
             "你好，世界！欢迎使用这个聊天页面。", "请用中文回答问题，谢谢你的帮助。"] * 3)


# ---- the server ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_tokenizer):
    from lmforge.artifacts.model_dir import save_model_dir
    from lmforge.models.config import ModelConfig
    from lmforge.models.transformer import build_model
    from lmforge.tokenizer.chat_template import save_chat_template

    d = tmp_path_factory.mktemp("chatpage")
    make_tokenizer(d, CORPUS, vocab_size=400, name="tok")
    save_chat_template(ECHO_TEMPLATE, d / "tok")
    cfg = ModelConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=1024,
                      tie_embeddings=True)
    return save_model_dir(build_model(cfg, seed=0), d / "model", tokenizer_dir=str(d / "tok"))


def http(url: str, body: dict | None = None, key: str | None = API_KEY, timeout: float = WAIT_S):
    """(status, headers, body bytes) of a GET (``body`` None) or a JSON POST."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """Base URL of `lmforge serve --api-key` on a free 127.0.0.1 port, ready to answer."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir),
                                 "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + WAIT_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"lmforge serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if http(url + "/v1/models", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"lmforge serve did not answer within {WAIT_S}s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def complete(server: str, messages: list[dict], max_tokens: int) -> tuple[str, str]:
    """(text, finish_reason) of the server's non-streamed greedy reply."""
    model = json.loads(http(server + "/v1/models")[2])["data"][0]["id"]
    status, _, body = http(server + "/v1/chat/completions", {
        "model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens})
    assert status == 200, body[:500]
    choice = json.loads(body)["choices"][0]
    return choice["message"]["content"], choice["finish_reason"]


# ---- the browser ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through chromedriver (Selenium), one per module."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra: pip install -e .[dev]")
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.access(path, os.X_OK) or shutil.which(path)):
            pytest.skip(f"{path} not found: apt-get install -y chromium chromium-driver (as .ci/run does)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,760", "--lang=en-US", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what: str, timeout: float = WAIT_S):
    """Poll ``condition(driver)`` until truthy; fail naming ``what``."""
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)
    except Exception:  # noqa: BLE001 - TimeoutException: say what did not happen, with the page's error line
        error = driver.execute_script("return document.getElementById('error').textContent")
        pytest.fail(f"timed out waiting for {what}; page error: {error!r}")


def open_page(driver, server: str, key: str | None = API_KEY):
    """A fresh page (new conversation, settings back to defaults) with ``key`` in the API key field."""
    driver.get(server + "/")
    driver.execute_script("localStorage.clear()")
    driver.get(server + "/")
    wait_for(driver, lambda d: d.execute_script("return !!window.lmforgeChat"), "chat.js to load")
    if key:
        field = driver.find_element("id", "api-key")
        field.send_keys(key)
        driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)
    return driver


def set_field(driver, field_id: str, value) -> None:
    driver.execute_script("const el = document.getElementById(arguments[0]); el.value = arguments[1];"
                          "el.dispatchEvent(new Event('change'));", field_id, str(value))


def send(driver, text: str) -> None:
    box = driver.find_element("id", "input")
    box.clear()
    box.send_keys(text)
    driver.find_element("id", "send").click()


def last(driver, role: str):
    """state, chunks and text of the last message of ``role``, or None."""
    return driver.execute_script("""
        const items = document.querySelectorAll('.message.' + arguments[0]);
        const m = items[items.length - 1];
        return m ? {state: m.dataset.state || null, chunks: Number(m.dataset.chunks || 0),
                    text: m.querySelector('.text').textContent} : null;""", role)


def is_idle(driver) -> bool:
    return driver.execute_script("""return document.body.dataset.busy === 'false'
        && !document.getElementById('send').disabled && document.getElementById('stop').disabled""")


def watch_reply_lengths(driver) -> None:
    """Record the length of the streaming reply's text after every DOM change (window.replyLengths)."""
    driver.execute_script("""
        window.replyLengths = [];
        new MutationObserver(() => {
            const items = document.querySelectorAll('.message.assistant .text');
            if (items.length) window.replyLengths.push(items[items.length - 1].textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});""")


# ---- tests -------------------------------------------------------------------------------------------------------
def test_page_and_assets_are_served_as_utf8(server, request):
    # over HTTP: each file as is, declared UTF-8 (each holds non-ASCII text, so another charset garbles it).
    # A script typed application/javascript (the system's mime table decides) carries no charset parameter
    # and is read in the page's charset; the browser part below checks that its text arrives intact.
    files = {"/": ("index.html", "text/html"), "/static/chat.js": ("chat.js", "javascript"),
             "/static/chat.css": ("chat.css", "text/css")}
    for path, (name, kind) in files.items():
        status, headers, body = http(server + path, key=None)  # the page itself needs no key; the API does
        assert status == 200 and kind in headers.get_content_type(), (path, headers.get("content-type"))
        utf8_or_page = headers.get_content_type() == "application/javascript" and not headers.get_content_charset()
        assert headers.get_content_charset() == "utf-8" or utf8_or_page, (path, headers.get("content-type"))
        assert body == (REPO / "lmforge/serve/static" / name).read_bytes()
        assert any(ord(c) > 127 for c in body.decode("utf-8")), name
    html = http(server + "/", key=None)[2].decode("utf-8")
    assert '<meta charset="utf-8">' in html and 'src="static/chat.js"' in html and 'href="static/chat.css"' in html

    # in the browser (where Chromium is installed): the non-ASCII text of each file arrives intact, and
    # messages are set in a stack that reaches Debian's CJK font
    browser = request.getfixturevalue("browser")
    open_page(browser, server)
    assert browser.execute_script("return document.characterSet") == "UTF-8"
    assert browser.find_element("id", "input").get_attribute("placeholder").startswith("Message — Enter")
    model = json.loads(http(server + "/v1/models")[2])["data"][0]["id"]
    wait_for(browser, lambda d: d.find_element("id", "model").text == f"{model} · context 1024",
             "chat.js to show the model and its context")
    styles = browser.execute_script("""
        const m = document.createElement('div'); m.className = 'message assistant'; m.dataset.state = 'streaming';
        const t = document.createElement('span'); t.className = 'text'; t.textContent = '你好';
        m.appendChild(t); document.getElementById('messages').appendChild(m);
        const out = {cursor: getComputedStyle(t, '::after').content, font: getComputedStyle(t).fontFamily};
        m.remove();
        return out;""")
    assert styles["cursor"] == '"▍"', styles
    assert '"Noto Sans CJK SC"' in styles["font"] and '"WenQuanYi Zen Hei"' in styles["font"], styles


def test_sse_parser_decodes_characters_split_across_chunks(browser, server):
    """The page's SSE reader gets the same events however the bytes are cut, even inside a 3-byte character
    or between the \\r and \\n of a line end."""
    open_page(browser, server, key=None)
    stream = ('data: {"choices":[{"delta":{"content":"你好"}}]}\r\n\r\n: keep-alive\n\n'
              'data: {"choices":[{"delta":{"content":" 世界, ok"}}]}\n\ndata: [DONE]\n\n').encode()
    expected = ['{"choices":[{"delta":{"content":"你好"}}]}', '{"choices":[{"delta":{"content":" 世界, ok"}}]}',
                "[DONE]"]
    results = browser.execute_script("""
        const bytes = new Uint8Array(arguments[0]);
        const out = [];
        for (let cut = 0; cut <= bytes.length; cut++) {  // every split into two chunks
            const events = [];
            const parser = window.lmforgeChat.createSseParser((data) => events.push(data));
            parser.push(bytes.slice(0, cut)); parser.push(bytes.slice(cut)); parser.end();
            out.push(events);
        }
        const one = [];  // and one byte at a time
        const parser = window.lmforgeChat.createSseParser((data) => one.push(data));
        for (const b of bytes) parser.push(new Uint8Array([b]));
        parser.end();
        out.push(one);
        return out;""", list(stream))
    assert len(results) == len(stream) + 2
    for i, events in enumerate(results):
        assert events == expected, f"split at byte {i}: {events}"


def test_without_the_key_the_page_shows_401_and_keeps_the_message(browser, server):
    open_page(browser, server, key=None)
    wait_for(browser, lambda d: d.find_element("id", "model").text == "API key needed", "the 401 on /v1/models")
    send(browser, "hello there")
    wait_for(browser, lambda d: d.find_element("id", "error").is_displayed(), "the error line")
    error = browser.find_element("id", "error").text
    assert "HTTP 401" in error and "API key" in error, error
    assert browser.find_element("id", "input").get_attribute("value") == "hello there"  # nothing lost
    assert last(browser, "user") is None and last(browser, "assistant") is None
    assert is_idle(browser)


def test_a_request_the_server_refuses_is_shown_and_nothing_is_lost(browser, server):
    open_page(browser, server)
    wait_for(browser, lambda d: "context 1024" in d.find_element("id", "model").text, "the model's context")
    set_field(browser, "max-tokens", 5000)  # more than the model's context of 1024
    send(browser, "hello there")
    wait_for(browser, lambda d: d.find_element("id", "error").is_displayed(), "the error line")
    error = browser.find_element("id", "error").text
    assert "HTTP 400" in error and "context" in error, error  # the server's own message, e.g. "ask for at most …"
    assert browser.find_element("id", "input").get_attribute("value") == "hello there"
    assert last(browser, "user") is None and is_idle(browser)
    set_field(browser, "max-tokens", 0)  # and a setting the page itself rejects never reaches the server
    browser.find_element("id", "send").click()
    wait_for(browser, lambda d: "max tokens must be" in d.find_element("id", "error").text, "the settings error")
    assert browser.find_element("id", "input").get_attribute("value") == "hello there"
    assert last(browser, "user") is None and is_idle(browser)


def test_reply_streams_into_the_page(browser, server):
    open_page(browser, server)
    wait_for(browser, lambda d: d.find_element("id", "model").text not in ("connecting…", "API key needed"),
             "the model name from /v1/models")
    set_field(browser, "temperature", 0)
    set_field(browser, "max-tokens", 40)
    set_field(browser, "system", "You are terse.")
    watch_reply_lengths(browser)
    from selenium.webdriver.common.keys import Keys

    box = browser.find_element("id", "input")  # typed: Shift+Enter is a new line, Enter sends
    box.send_keys("tell me", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "about the cat")
    assert last(browser, "user") is None and box.get_attribute("value") == "tell me\nabout the cat"
    box.send_keys(Keys.ENTER)
    wait_for(browser, lambda d: (last(d, "assistant") or {}).get("state") not in (None, "streaming"), "the reply")
    assert last(browser, "user")["text"] == "tell me\nabout the cat" and box.get_attribute("value") == ""
    reply = last(browser, "assistant")
    expected, finish = complete(server, [{"role": "system", "content": "You are terse."},
                                         {"role": "user", "content": "tell me\nabout the cat"}], 40)
    assert reply["text"] == expected and reply["state"] == finish
    assert reply["chunks"] >= 10, reply  # token by token, not one blob
    # the text grew in the DOM step by step (events that arrive in one network read show as one step)
    lengths = [n for n in browser.execute_script("return window.replyLengths") if n > 0]
    assert lengths == sorted(lengths) and len(set(lengths)) >= 3, lengths
    assert lengths[-1] == len(expected)
    assert is_idle(browser) and browser.find_element("id", "error").text == ""


def test_stop_ends_the_stream_and_the_page_is_ready_again(browser, server):
    open_page(browser, server)
    set_field(browser, "temperature", 0)
    set_field(browser, "max-tokens", 800)
    prompt = "write a very long story about the dog"
    full, finish = complete(server, [{"role": "user", "content": prompt}], 800)
    assert finish == "length", "precondition: the greedy reply runs to max_tokens, so there is a stream to stop"
    send(browser, prompt)
    wait_for(browser, lambda d: (last(d, "assistant") or {}).get("chunks", 0) >= 5, "the first chunks")
    browser.find_element("id", "stop").click()
    wait_for(browser, is_idle, "the page to be ready after stop")
    stopped = last(browser, "assistant")
    assert stopped["state"] == "stopped", stopped
    assert 0 < len(stopped["text"]) < len(full) and full.startswith(stopped["text"])
    assert "stopped" in browser.find_element("css selector", ".message.assistant .note").text
    time.sleep(0.5)  # the stream is over: nothing more arrives
    assert last(browser, "assistant")["text"] == stopped["text"]
    deadline = time.monotonic() + WAIT_S  # and the server let go of the sequence (no slot held by a dead stream)
    while (health := json.loads(http(server + "/health", key=None)[2]))["active"] or health["queued"]:
        assert time.monotonic() < deadline, health
        time.sleep(0.05)
    # and the server still answers: the next turn (with the stopped reply in the history) streams to the end
    set_field(browser, "max-tokens", 8)
    send(browser, "and then?")
    wait_for(browser, lambda d: (last(d, "assistant") or {}).get("state") not in (None, "streaming"), "the next reply")
    expected, finish = complete(server, [{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": stopped["text"]},
                                         {"role": "user", "content": "and then?"}], 8)
    assert last(browser, "assistant")["text"] == expected and last(browser, "assistant")["state"] == finish


def test_an_error_in_mid_stream_keeps_the_text_received(browser, server):
    """The server sends an error event when decoding fails after the reply began; a healthy server never does, so
    this test hands the page a response of that shape from a stubbed ``fetch`` (the rest of the page is real)."""
    open_page(browser, server)
    browser.execute_script("""
        const frames = ['data: {"choices":[{"index":0,"delta":{"content":"partial 文字"}}]}\\n\\n',
                        'data: {"error":{"message":"decoding failed","type":"server_error"}}\\n\\ndata: [DONE]\\n\\n'];
        window.fetch = async () => new Response(new ReadableStream({
            start(c) { for (const f of frames) c.enqueue(new TextEncoder().encode(f)); c.close(); }}),
            {status: 200, headers: {"Content-Type": "text/event-stream"}});""")
    send(browser, "hello")
    wait_for(browser, lambda d: (last(d, "assistant") or {}).get("state") not in (None, "streaming"), "the reply")
    reply = last(browser, "assistant")
    assert reply["state"] == "error" and reply["text"] == "partial 文字", reply
    assert "interrupted by an error" in browser.find_element("css selector", ".message.assistant .note").text
    assert browser.find_element("id", "error").text == "error: decoding failed" and is_idle(browser)


def test_chinese_round_trips(browser, server, tmp_path):
    open_page(browser, server)
    set_field(browser, "temperature", 0)
    set_field(browser, "max-tokens", 24)
    set_field(browser, "system", "你是一个乐于助人的助手。")
    send(browser, CHINESE)
    wait_for(browser, lambda d: (last(d, "assistant") or {}).get("state") not in (None, "streaming"), "the reply")
    assert last(browser, "user")["text"] == CHINESE
    reply = last(browser, "assistant")["text"]
    expected, _ = complete(server, [{"role": "system", "content": "你是一个乐于助人的助手。"},
                                    {"role": "user", "content": CHINESE}], 24)
    assert reply == expected and "\ufffd" not in reply  # no character broken at a chunk boundary
    assert any("\u4e00" <= ch <= "\u9fff" for ch in reply), reply  # the reply itself holds Chinese characters
    # a second turn: the Chinese history goes back to the server intact
    set_field(browser, "max-tokens", 12)
    send(browser, "and the cat")
    wait_for(browser, lambda d: (last(d, "assistant") or {}).get("state") not in (None, "streaming"), "turn two")
    expected, _ = complete(server, [{"role": "system", "content": "你是一个乐于助人的助手。"},
                                    {"role": "user", "content": CHINESE}, {"role": "assistant", "content": reply},
                                    {"role": "user", "content": "and the cat"}], 12)
    assert last(browser, "assistant")["text"] == expected
    assert [m.text.splitlines()[1] for m in browser.find_elements("css selector", ".message")][:2] == [CHINESE, reply]
    shot = Path(os.environ.get("LMFORGE_CHAT_SCREENSHOT") or tmp_path / "chat_page.png")
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
