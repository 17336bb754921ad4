// The page shell: API calls (with an API key asked for on a 401 and kept in sessionStorage only), the view
// switch between / (chat and bus) and /bus (bus only), and the live bus view polled from /bus.json.
// Model and user text only ever reaches the page through textContent.

const KEY_STORAGE = "llmbus-api-key";
const POLL_MS = 1500;

// ---- API calls ----

let pendingKey = null; // one dialog for every call that got a 401 at the same time
const forgetListeners = new Set();

// A key travels in a header, which carries ISO-8859-1 only (anything else makes fetch throw before it sends), and
// API keys are printable ASCII: so a key is 0x21-0x7E, which also catches a pasted zero-width or non-breaking space.
const KEY_CHARACTERS = /^[\x21-\x7E]+$/;

// Why a (non-empty) key cannot be used, or "" when it can. The key itself is never shown.
function keyProblem(key) {
  const chars = [...key];
  const index = chars.findIndex((char) => !KEY_CHARACTERS.test(char));
  if (index < 0) return "";
  const code = `U+${chars[index].codePointAt(0).toString(16).toUpperCase().padStart(4, "0")}`;
  return `An API key is printable ASCII without spaces; this one has ${code} at character ${index + 1}. Enter it without that character.`;
}

export class KeyRequired extends Error {
  constructor() {
    super("API key needed");
    this.name = "KeyRequired";
  }
}

// fetch with the stored API key; on a 401 (or a stored key no header can carry) the key is forgotten and asked
// for, and the call is made again. `onSend` is called just before each try: the last call before a response this
// returns is the request that answered (the time spent in the key dialog is not part of it).
export async function apiFetch(path, init = {}, { onSend = () => {} } = {}) {
  for (;;) {
    const headers = new Headers(init.headers || {});
    const key = sessionStorage.getItem(KEY_STORAGE);
    const problem = key === null ? "" : keyProblem(key);
    if (problem) {
      forgetKey(); // as a 401 would: the bridge could never have accepted it
      if (!(await askForKey(`The stored API key cannot be sent. ${problem}`))) throw new KeyRequired();
      continue;
    }
    if (key) headers.set("Authorization", `Bearer ${key}`);
    onSend();
    const response = await fetch(path, { ...init, headers });
    if (response.status !== 401) return response;
    if (key) forgetKey();
    const entered = await askForKey(`The bridge answered 401: ${await errorMessage(response)}`);
    if (!entered) throw new KeyRequired();
  }
}

// `listener()` is called when the key is forgotten (Forget API key): the calls it made may need a new one.
export function onKeyForgotten(listener) {
  forgetListeners.add(listener);
}

export async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error;
    if (typeof error === "string") return error;
    if (error && typeof error.message === "string") return error.message;
  } catch {
    // not JSON: fall through to the status line
  }
  return `${response.status} ${response.statusText || "error"}`.trim();
}

function showKeyError(message) {
  const box = document.getElementById("key-error");
  box.textContent = message;
  box.hidden = !message;
}

function askForKey(reason) {
  if (pendingKey) return pendingKey;
  const dialog = document.getElementById("key-dialog");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason;
  input.value = "";
  showKeyError("");
  pendingKey = new Promise((resolve) => {
    dialog.addEventListener(
      "close",
      () => {
        const key = input.value.trim();
        input.value = "";
        pendingKey = null;
        if (dialog.returnValue === "save" && key) {
          sessionStorage.setItem(KEY_STORAGE, key);
          showForgetKey();
          resumePolling();
          resolve(true);
        } else {
          resolve(false);
        }
      },
      { once: true },
    );
    dialog.returnValue = ""; // Esc keeps the last returnValue: an earlier "save" would save what was typed
    dialog.showModal();
    input.focus();
  });
  return pendingKey;
}

// "Use key" keeps the dialog open, saying why, while the key has a character no header can carry.
document.getElementById("key-form").addEventListener("submit", (event) => {
  if (event.submitter?.value !== "save") return;
  const problem = keyProblem(document.getElementById("key-input").value.trim());
  showKeyError(problem);
  if (problem) event.preventDefault();
});
document.getElementById("key-input").addEventListener("input", () => showKeyError(""));

function showForgetKey() {
  document.getElementById("forget-key").hidden = !sessionStorage.getItem(KEY_STORAGE);
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  showForgetKey();
}

// ---- views ----

function setView() {
  const view = location.pathname === "/bus" ? "bus" : "chat";
  document.body.dataset.view = view;
  for (const link of document.querySelectorAll("nav a[data-view]")) {
    if (link.dataset.view === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
}

// ---- the bus view ----

const listeners = new Set();
export const bus = { view: null, chatSubject: "llm.chat" };

export function onBus(listener) {
  listeners.add(listener);
  if (bus.view) listener(bus.view);
}

export function formatDuration(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const whole = Math.floor(seconds);
  const days = Math.floor(whole / 86400);
  const hours = Math.floor((whole % 86400) / 3600);
  const minutes = Math.floor((whole % 3600) / 60);
  const secs = whole % 60;
  const two = (n) => String(n).padStart(2, "0");
  if (days) return `${days}d${two(hours)}h`;
  if (hours) return `${hours}h${two(minutes)}m`;
  if (minutes) return `${minutes}m${two(secs)}s`;
  return `${secs}s`;
}

function rate(value) {
  return value === null || value === undefined ? "-" : value.toFixed(1);
}

// A count /bus.json gives as null when no $SRV.STATS answer said it (a login without that permission).
function count(value) {
  return value === null || value === undefined ? "-" : String(value);
}

function cell(row, text, column, className = "") {
  const td = document.createElement("td");
  td.textContent = text;
  td.dataset.col = column;
  if (className) td.className = className;
  row.append(td);
  return td;
}

// A worker's state as /bus.json derives it (worker_rows.worker_state), with its look and explanation.
const STATES = {
  draining: ["warn", "finishing its requests before it stops; it takes no new ones"],
  degraded: ["warn", "its compiled decode step failed: it decodes eagerly, several times slower on a GPU (see its log)"],
  warming: ["ok", "its decode step is compiling; it serves eagerly meanwhile"],
  serving: ["ok", "serving"],
  unknown: ["", "no $SRV.STATS answer: this login may lack the permission to ask for it"],
};

function workerRow(worker) {
  const tr = document.createElement("tr");
  tr.dataset.workerId = worker.id;
  const where = worker.host ? `${worker.host}${worker.pid === null ? "" : `:${worker.pid}`}` : worker.id;
  cell(tr, where, "worker").title = `micro service id ${worker.id}`;
  cell(tr, worker.model || "-", "model", "model");
  cell(tr, [worker.device, worker.dtype].filter(Boolean).join(" ") || "-", "device", "opt");
  cell(tr, count(worker.running), "running", "num");
  cell(tr, count(worker.waiting), "waiting", "num");
  cell(tr, rate(worker.tokens_per_s), "tokens_per_s", "num");
  cell(tr, formatDuration(worker.uptime_s), "uptime", "opt");
  const [look, help] = STATES[worker.state] || ["", ""];
  cell(tr, worker.state, "state", look).title = help;
  cell(tr, `${count(worker.requests)} / ${count(worker.errors)}`, "requests", "num opt");
  cell(tr, count(worker.cancelled), "cancelled", "num");
  return tr;
}

function renderTotals(totals) {
  const parts = [
    ["workers", `${totals.workers} worker${totals.workers === 1 ? "" : "s"}`],
    ["draining", `${count(totals.draining)} draining`],
    ["compile_failed", `${count(totals.compile_failed)} degraded`],
    ["running", `${count(totals.running)} running`],
    ["waiting", `${count(totals.waiting)} waiting`],
    ["tokens_per_s", `${rate(totals.tokens_per_s)} tok/s`],
    ["requests", `${count(totals.requests)} requests`],
    ["errors", `${count(totals.errors)} errors`],
    ["cancelled", `${count(totals.cancelled)} cancelled`],
  ];
  const spans = parts.map(([name, text]) => {
    const span = document.createElement("span");
    span.dataset.total = name;
    span.textContent = text;
    return span;
  });
  document.getElementById("bus-totals").replaceChildren(...spans);
}

function renderBus(view) {
  document.querySelector("#workers tbody").replaceChildren(...view.workers.map(workerRow));
  renderTotals(view.totals);
  const interval = view.interval_s === null ? "" : `, tokens/s over the last ${view.interval_s.toFixed(1)} s`;
  const models = view.totals.models.length ? ` · serving ${view.totals.models.join(", ")}` : "";
  document.getElementById("bus-status").textContent = `Updated ${new Date(view.time).toLocaleTimeString()}${interval}${models}`;
}

let pollTimer = null;
let polling = false;
let pollStopped = false; // no key (the dialog was cancelled, or Forget API key): polling waits for one

function schedulePoll(ms) {
  clearTimeout(pollTimer);
  pollTimer = setTimeout(pollBus, ms);
}

async function pollBus() {
  if (polling || pollStopped) return;
  polling = true;
  try {
    const response = await apiFetch("/bus.json");
    if (!response.ok) throw new Error(await errorMessage(response));
    const view = await response.json();
    if (!pollStopped) {
      // not forgotten while this poll was on its way
      bus.view = view;
      bus.chatSubject = view.chat_subject || bus.chatSubject;
      renderBus(view);
      for (const listener of listeners) listener(view);
    }
  } catch (error) {
    if (error instanceof KeyRequired) pausePolling(error.message);
    else document.getElementById("bus-status").textContent = `Bus view unavailable: ${error.message}`;
  } finally {
    polling = false;
  }
  if (!pollStopped && !document.hidden) schedulePoll(POLL_MS);
}

// Polling waits for a key: without one, the next poll's 401 would open the key dialog at once.
function pausePolling(reason) {
  pollStopped = true;
  clearTimeout(pollTimer);
  const retry = document.body.dataset.view === "bus" ? " (reload to enter one)" : " (Send asks for it)";
  document.getElementById("bus-status").textContent = `Bus view unavailable: ${reason}${retry}`;
}

function resumePolling() {
  if (!pollStopped) return;
  pollStopped = false;
  schedulePoll(0);
}

document.addEventListener("visibilitychange", () => {
  if (!document.hidden && !pollStopped) schedulePoll(0);
});

document.getElementById("forget-key").addEventListener("click", () => {
  forgetKey();
  pausePolling("API key forgotten");
  for (const listener of forgetListeners) listener();
});

setView();
showForgetKey();
pollBus();
