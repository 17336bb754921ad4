// The chat playground: streams /v1/chat/completions over SSE (fetch + ReadableStream, since EventSource cannot
// POST), sends the whole conversation as `messages`, and stops a generation by aborting the fetch (the bridge
// then cancels it on the worker). Model and user text only ever reaches the page through textContent.

import { apiFetch, errorMessage, KeyRequired, onBus, onKeyForgotten } from "./app.js";
import { curlCommand, natsRequest, pythonCode } from "./request.js";

const $ = (id) => document.getElementById(id);
const history = []; // the conversation so far: {role, content}
let controller = null; // the running generation's AbortController
let lastRequest = null; // the body of the last call, for "Show the request"
let callCount = 0;

// ---- models ----

// The bus view names every model on this bridge's subject prefix (draining workers' too), /v1/models only those
// this bridge can ask, so the two may differ for good: the list reloads when the bus's names change since the
// last load, not on every poll. A failed load is tried again after MODELS_RETRY_MS.
const MODELS_RETRY_MS = 15_000;
const MODELS_FAILED = "Could not list models: ";
let busModels = null; // the bus view's model names when the list last loaded
let modelsLoad = null; // the load in flight
let retryModelsAt = null; // performance.now() after which a failed load is tried again
let keyNeeded = false; // the list is empty because the bridge wants an API key

function showModels(names, empty) {
  const select = $("model");
  const chosen = select.value;
  const options = names.map((name) => new Option(name, name, false, name === chosen));
  if (!options.length) options.push(new Option(empty, "", true, true));
  select.replaceChildren(...options);
}

async function fetchModels() {
  try {
    const response = await apiFetch("/v1/models");
    if (!response.ok) throw new Error(await errorMessage(response));
    showModels((await response.json()).data.map((card) => card.id), "no model on the bus");
    keyNeeded = false;
    retryModelsAt = null;
    if ($("chat-error").textContent.startsWith(MODELS_FAILED)) showError("");
  } catch (error) {
    keyNeeded = error instanceof KeyRequired;
    if (keyNeeded) showModels([], "API key needed");
    else {
      retryModelsAt = performance.now() + MODELS_RETRY_MS;
      showError(`${MODELS_FAILED}${error.message}`);
    }
  }
  renderRequest();
}

function loadModels() {
  modelsLoad ??= fetchModels().finally(() => {
    modelsLoad = null;
  });
  return modelsLoad;
}

onBus((view) => {
  const names = view.totals.models.join("\n");
  const retry = retryModelsAt !== null && performance.now() >= retryModelsAt;
  if (modelsLoad || (names === busModels && !retry)) return;
  busModels = names;
  loadModels();
});

// Forget API key: as after a cancelled key dialog, the list says why it is empty and Send asks for a key.
onKeyForgotten(() => {
  keyNeeded = true;
  showModels([], "API key needed");
  renderRequest();
});

// ---- the conversation ----

function settings() {
  const temperature = Number.parseFloat($("temperature").value);
  const maxTokens = Number.parseInt($("max-tokens").value, 10);
  return {
    model: $("model").value,
    system: $("system-prompt").value.trim(),
    temperature: Number.isFinite(temperature) ? temperature : 0,
    maxTokens: Number.isFinite(maxTokens) ? maxTokens : 256,
  };
}

function requestBody(turns) {
  const { model, system, temperature, maxTokens } = settings();
  const messages = system ? [{ role: "system", content: system }, ...turns] : [...turns];
  return {
    model,
    messages,
    temperature,
    max_tokens: maxTokens,
    stream: true,
    stream_options: { include_usage: true },
  };
}

function addTurn(role, text) {
  const item = document.createElement("li");
  item.className = `turn ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role === "user" ? "You" : "Model";
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  item.append(label, body);
  if (role === "assistant") {
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = "waiting for the first token…";
    item.append(meta);
  }
  $("log").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function showError(message) {
  const box = $("chat-error");
  box.textContent = message;
  box.hidden = !message;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("new-chat").disabled = busy;
}

// The `data:` payloads of an SSE body. However the caller's loop ends (break, throw, Stop), the body is cancelled,
// which closes the fetch, so the bridge stops the generation on the worker.
export async function* sseData(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = block
          .split(/\r?\n/)
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart());
        if (data.length) yield data.join("\n");
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // already closed or aborted: nothing left to stop
  }
}

function describe(answer, outcome) {
  const { tokens, ttftMs, tokensPerS } = outcome;
  const parts = [];
  if (tokens !== null) parts.push(`${tokens} tokens`);
  if (ttftMs !== null) parts.push(`TTFT ${Math.round(ttftMs)} ms`);
  if (tokensPerS !== null) parts.push(`${tokensPerS.toFixed(1)} tok/s`);
  parts.push(outcome.finish);
  const meta = answer.querySelector(".meta");
  meta.textContent = parts.join(" · ");
  meta.title = "tokens: usage.completion_tokens · TTFT: send to first text · tok/s: tokens after the first / time after it";
  answer.dataset.finish = outcome.finish;
  if (tokens !== null) answer.dataset.tokens = String(tokens);
}

async function send(text) {
  showError("");
  if (keyNeeded) await loadModels(); // the key dialog was cancelled: ask for the key again
  history.push({ role: "user", content: text });
  const body = requestBody(history);
  if (!body.model) {
    history.pop();
    showError(keyNeeded ? "API key needed: Send asks for it." : "No model to ask: no worker on the bus serves one yet.");
    return false;
  }
  lastRequest = body;
  renderRequest();
  const question = addTurn("user", text);
  const answer = addTurn("assistant", "");
  const output = answer.querySelector(".text");
  controller = new AbortController();
  setBusy(true);
  let started = null; // when the request that answered was sent: not before a key dialog it waited for
  let first = null;
  let reply = "";
  let usage = null;
  let finish = "incomplete";
  try {
    const response = await apiFetch(
      "/v1/chat/completions",
      {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
        signal: controller.signal,
      },
      {
        onSend: () => {
          started = performance.now();
        },
      },
    );
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const event = JSON.parse(data);
      if (event.error) throw new Error(event.error.message || "the stream failed");
      const choice = event.choices && event.choices[0];
      const delta = choice && choice.delta && choice.delta.content;
      if (delta) {
        first ??= performance.now();
        reply += delta;
        output.textContent = reply;
        answer.scrollIntoView({ block: "end" });
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (event.usage) usage = event.usage;
    }
  } catch (error) {
    if (error.name === "AbortError") finish = "stopped";
    else {
      finish = "failed";
      showError(error.message);
    }
  } finally {
    controller = null;
    setBusy(false);
  }
  const ended = performance.now();
  const tokens = usage ? usage.completion_tokens : null;
  const decodeSeconds = first === null ? 0 : (ended - first) / 1000;
  describe(answer, {
    finish,
    tokens,
    ttftMs: first === null ? null : first - started,
    tokensPerS: tokens !== null && tokens > 1 && decodeSeconds > 0 ? (tokens - 1) / decodeSeconds : null,
  });
  // An answer with no text (an end of sequence first) stays as an empty turn, so roles keep alternating.
  if (reply || (finish !== "failed" && finish !== "stopped")) history.push({ role: "assistant", content: reply });
  else {
    // Not answered (failed, or stopped before its first token): the turn leaves the conversation and the screen
    // and goes back to the prompt box, so the next request never carries two user messages in a row.
    history.pop();
    question.remove();
    answer.remove();
    return false;
  }
  return true;
}

// ---- "Show the request" ----

function renderRequest() {
  const draft = $("prompt").value.trim() || "What is the capital of France?";
  const body = lastRequest ?? requestBody([...history, { role: "user", content: draft }]);
  $("request-curl").textContent = curlCommand(body);
  $("request-nats").textContent = natsRequest(body, `playground-${lastRequest ? callCount : callCount + 1}`);
  $("request-python").textContent = pythonCode(body);
}

// ---- wiring ----

$("composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  const prompt = $("prompt");
  const text = prompt.value.trim();
  if (!text || controller) return;
  prompt.value = "";
  callCount += 1;
  if (!(await send(text))) prompt.value = text;
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => controller?.abort());

$("new-chat").addEventListener("click", () => {
  history.length = 0;
  lastRequest = null;
  $("log").replaceChildren();
  showError("");
  renderRequest();
});

for (const id of ["prompt", "system-prompt", "temperature", "max-tokens", "model"]) {
  $(id).addEventListener("input", () => {
    if (!controller) lastRequest = null;
    renderRequest();
  });
}

loadModels();
