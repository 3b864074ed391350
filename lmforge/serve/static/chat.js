// lmforge chat page: talks to the OpenAI-compatible API of the same server (`lmforge serve`).
// POST v1/chat/completions with stream: true, read the server-sent events with fetch + ReadableStream, and
// append each choices[0].delta.content to the reply. Stop aborts the request (the server frees the slot).
"use strict";

// ---- Server-sent events: bytes in, one callback per event's data --------------------------------------------
// A network chunk may end in the middle of a line or of a multi-byte UTF-8 character (a Chinese character is
// 3 bytes); TextDecoder with {stream: true} holds the partial bytes back until the rest arrives.
function createSseParser(onData) {
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  let dataLines = [];

  function handleLine(line) {
    if (line === "") {  // a blank line ends an event
      if (dataLines.length) onData(dataLines.join("\n"));
      dataLines = [];
      return;
    }
    if (line.startsWith(":")) return;  // comment / keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") dataLines.push(value);  // "event", "id", "retry": not used by the OpenAI API
  }

  function drainLines() {
    let end;
    while ((end = /\r\n|\r|\n/.exec(buffer)) !== null) {
      if (end[0] === "\r" && end.index === buffer.length - 1) break;  // maybe the first half of "\r\n"
      const line = buffer.slice(0, end.index);
      buffer = buffer.slice(end.index + end[0].length);
      handleLine(line);
    }
  }

  return {
    push(bytes) {
      buffer += decoder.decode(bytes, { stream: true });
      drainLines();
    },
    end() {  // the body ended: flush the decoder and any unterminated event
      buffer += decoder.decode() + "\n\n";
      drainLines();
    },
  };
}

// ---- Errors in OpenAI's JSON shape ---------------------------------------------------------------------------
const HINTS = {
  401: "enter the server's API key in the settings (it was started with --api-key)",
  413: "the conversation is too long for the model's context; start a new chat or lower max tokens",
  429: "the server is busy; try again in a moment",
  503: "the server is busy or still loading; try again in a moment",
};

async function describeHttpError(response) {
  let message = "";
  try {
    const text = await response.text();
    try {
      const body = JSON.parse(text);
      message = (body && body.error && (body.error.message || body.error)) || body.detail || text;
    } catch (_) {
      message = text;
    }
  } catch (_) { /* body unreadable: the status says enough */ }
  const hint = HINTS[response.status];
  const head = `error: HTTP ${response.status}${response.statusText ? " " + response.statusText : ""}`;
  return [head + (message ? ` — ${String(message).slice(0, 500)}` : ""), hint].filter(Boolean).join("\n");
}

// ---- The page ------------------------------------------------------------------------------------------------
const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "max-tokens"];  // remembered in localStorage; the API key is not

const state = {
  history: [],         // [{role, content}] sent with every request (system prompt added in front)
  controller: null,    // AbortController of the request in flight
  model: null,         // id from GET v1/models
};

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function setBusy(busy) {
  document.body.dataset.busy = String(busy);
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("new-chat").disabled = busy;
}

function scrollToEnd(force) {
  const list = $("messages");
  const nearEnd = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  if (force || nearEnd) list.scrollTop = list.scrollHeight;
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;  // textContent, never innerHTML: model output is shown as text
  item.append(label, body);
  $("messages").append(item);
  scrollToEnd(true);
  return item;
}

function setNote(item, status, note) {
  item.dataset.state = status;
  let el = item.querySelector(".note");
  if (!note) { if (el) el.remove(); return; }
  if (!el) {
    el = document.createElement("span");
    el.className = "note";
    item.append(el);
  }
  el.textContent = note;
}

function readSettings() {
  const temperature = Number($("temperature").value);
  if ($("temperature").value.trim() === "" || !Number.isFinite(temperature) || temperature < 0 || temperature > 2) {
    throw new Error("error: temperature must be a number from 0 to 2 (0 = greedy)");
  }
  const maxTokens = Number($("max-tokens").value);
  if (!Number.isInteger(maxTokens) || maxTokens < 1) {
    throw new Error("error: max tokens must be a whole number of at least 1");
  }
  return { temperature, max_tokens: maxTokens, system: $("system").value.trim() };
}

async function loadModel() {
  try {
    const response = await fetch("v1/models", { headers: authHeaders() });
    if (!response.ok) {
      $("model").textContent = response.status === 401 ? "API key needed" : `models: HTTP ${response.status}`;
      return null;
    }
    const body = await response.json();
    const model = body.data && body.data.length ? body.data[0] : null;
    state.model = model ? model.id : null;
    $("model").textContent = model ? model.id + (model.max_model_len ? ` · context ${model.max_model_len}` : "")
      : "no model";
    if (model && model.max_model_len) $("max-tokens").max = String(model.max_model_len);
    return state.model;
  } catch (_) {
    $("model").textContent = "server unreachable";
    return null;
  }
}

async function send(text, settings) {
  showError("");
  const controller = new AbortController();
  state.controller = controller;  // busy from here on: a second Enter does not send twice
  setBusy(true);
  const model = state.model || (await loadModel());
  const messages = (settings.system ? [{ role: "system", content: settings.system }] : [])
    .concat(state.history, [{ role: "user", content: text }]);
  const userItem = addMessage("user", text);
  const item = addMessage("assistant", "");
  const body = item.querySelector(".text");
  setNote(item, "streaming", "");
  item.dataset.chunks = "0";
  const started = performance.now();
  let reply = "";
  let chunks = 0;
  let finish = null;
  let sawDone = false;
  let outcome = "done";
  let failure = "";
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authHeaders() },
      body: JSON.stringify({
        model: model || "default", messages, stream: true,
        temperature: settings.temperature, max_tokens: settings.max_tokens,
      }),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await describeHttpError(response));
    const parser = createSseParser((data) => {
      if (data === "[DONE]") { sawDone = true; return; }
      const event = JSON.parse(data);
      if (event.error) throw new Error(`error: ${event.error.message || JSON.stringify(event.error)}`);
      const choice = event.choices && event.choices[0];
      if (!choice) return;  // e.g. a final usage-only chunk
      const piece = (choice.delta && choice.delta.content) || "";
      if (piece) {
        reply += piece;
        chunks += 1;
        body.textContent = reply;
        item.dataset.chunks = String(chunks);
        scrollToEnd(false);
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    const reader = response.body.getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(value);
    }
    parser.end();
  } catch (e) {
    controller.abort();  // an error mid-stream: close the connection too, so the server frees the slot
    if (e.name === "AbortError") {
      outcome = "stopped";
    } else {
      outcome = "error";
      failure = e instanceof TypeError ? `error: cannot reach the server (${e.message})` : e.message;
    }
  } finally {
    state.controller = null;
  }

  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  if (outcome !== "done" && reply === "") {
    // Nothing came back: take the turn off the screen and give the text back, so nothing is lost.
    userItem.remove();
    item.remove();
    if (!$("input").value) $("input").value = text;
  } else {
    state.history.push({ role: "user", content: text }, { role: "assistant", content: reply });
    const notes = {
      stopped: "stopped",
      error: "interrupted by an error",
      done: !sawDone && !finish ? "the stream ended early" : finish === "length" ? "max tokens reached"
        : reply === "" ? "(empty reply)" : "",
    };
    setNote(item, outcome === "done" ? (finish || "stop") : outcome, notes[outcome]);
  }
  if (failure) showError(failure);
  $("status").textContent = reply ? `${chunks} chunks in ${seconds} s` : "";
  setBusy(false);
  $("input").focus();
}

function stop() {
  if (state.controller) state.controller.abort();
}

function newChat() {
  if (state.controller) return;
  state.history = [];
  $("messages").replaceChildren();
  showError("");
  $("status").textContent = "";
}

function rememberSettings() {
  try {
    for (const id of SETTINGS) {
      const saved = localStorage.getItem(`lmforge.chat.${id}`);
      if (saved !== null) $(id).value = saved;
      $(id).addEventListener("change", () => localStorage.setItem(`lmforge.chat.${id}`, $(id).value));
    }
  } catch (_) { /* storage disabled: settings simply are not remembered */ }
}

function init() {
  rememberSettings();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    let settings;
    try {
      settings = readSettings();
    } catch (e) {
      showError(e.message);  // the message stays in the input box
      return;
    }
    $("input").value = "";
    send(text, settings);
  });
  $("input").addEventListener("keydown", (event) => {
    // Enter sends; Shift+Enter is a new line; Enter that confirms an IME composition (Chinese input) does not send.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("api-key").addEventListener("change", loadModel);
  setBusy(false);
  loadModel();
  $("input").focus();
}

window.lmforgeChat = { createSseParser, state };  // for tests and the browser console
document.addEventListener("DOMContentLoaded", init);
