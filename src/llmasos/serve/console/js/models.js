// Models: the store (GET /api/tags, a card from POST /api/show), pull with live progress (NDJSON from
// POST /api/pull), import from a path on the server, remove; and the loaded models (GET /api/ps) with
// their memory, speculative decoding and keep-alive countdown, loaded and unloaded with /api/load and /api/stop. The
// changes need an admin key once the server has keys: a 403 shows the server's message.

import { call, getJSON, ndjson } from "./api.js";
import { button, bytes, count, duration, fillTable, percent, showError, speculation } from "./format.js";

const $ = (id) => document.getElementById(id);
const PS_EVERY_MS = 5000;

let timer = null;
let countdowns = []; // [{cell, expiresAt}] for the loaded models, ticking between polls

export function init() {
  $("pull-form").addEventListener("submit", (event) => {
    event.preventDefault();
    pull($("pull-name").value.trim());
  });
  $("import-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const body = { path: $("import-path").value.trim() };
    if ($("import-name").value.trim()) body.name = $("import-name").value.trim();
    change(() => call("/api/import", { method: "POST", body }), () => $("import-form").reset());
  });
}

export function show() {
  refresh();
  timer = setInterval(tick, 1000);
}

export function hide() {
  clearInterval(timer);
  timer = null;
}

let sinceLoaded = 0;

function tick() {
  sinceLoaded += 1000;
  if (sinceLoaded >= PS_EVERY_MS) loaded();
  const now = performance.now();
  for (const { cell, expiresAt } of countdowns) {
    if (expiresAt !== null) cell.textContent = duration((expiresAt - now) / 1000);
  }
}

async function refresh() {
  await Promise.all([store(), loaded()]);
}

// Run a change; show its error (a 403 for a key without the admin flag, say) or refresh the page.
async function change(work, after = () => {}) {
  showError($("models-error"), null);
  try {
    await work();
    after();
  } catch (error) {
    showError($("models-error"), error);
  }
  await refresh();
}

async function store() {
  try {
    const { models } = await getJSON("/api/tags");
    fillTable(
      $("tags-table"),
      models.map((m) => [
        m.name,
        m.architecture,
        count(m.parameters),
        m.quantization,
        count(m.context_length),
        bytes(m.size),
        (m.digest || "").replace("sha256:", "").slice(0, 12),
        actions(m.name),
      ]),
      "The store is empty: pull a model above.",
    );
  } catch (error) {
    showError($("models-error"), error);
  }
}

function actions(name) {
  const span = document.createElement("span");
  span.className = "actions";
  const labelled = (label, onClick) => {
    const b = button(label, onClick, "quiet");
    b.setAttribute("aria-label", `${label} ${name}`);
    return b;
  };
  span.append(
    labelled("Card", () => card(name)),
    labelled("Load", () => change(() => call("/api/load", { method: "POST", body: { model: name } }))),
    labelled("Remove", () => {
      if (confirm(`Remove ${name} from the store?`)) {
        change(() => call("/api/delete", { method: "DELETE", body: { model: name } }));
      }
    }),
  );
  return span;
}

async function loaded() {
  sinceLoaded = 0;
  try {
    const ps = await getJSON("/api/ps");
    const now = performance.now();
    countdowns = [];
    fillTable(
      $("ps-table"),
      ps.models.map((m) => {
        const cell = document.createElement("span");
        const expiresAt = m.expires_in_s === null ? null : now + m.expires_in_s * 1000;
        cell.textContent = m.in_flight ? "busy" : duration(m.expires_in_s);
        if (!m.in_flight) countdowns.push({ cell, expiresAt });
        const unload = button("Unload", () =>
          change(() => call("/api/stop", { method: "POST", body: { model: m.model } })), "quiet");
        unload.setAttribute("aria-label", `Unload ${m.model}`);
        return [m.model, m.kind, bytes(m.memory_bytes), `${m.running} running, ${m.waiting} waiting`,
          percent(m.kv_cache_usage), speculation(m.speculative), cell, unload];
      }),
      "No model is loaded; a request loads its model, or press Load.",
    );
    $("ps-total").textContent = `Memory in use: ${bytes(ps.memory_bytes)}`;
  } catch (error) {
    showError($("models-error"), error);
  }
}

async function card(name) {
  const section = $("model-card");
  try {
    const shown = await getJSON("/api/show", { method: "POST", body: { model: name } });
    const heading = document.createElement("h2");
    heading.textContent = `Card of ${name}`;
    const pre = document.createElement("pre");
    pre.textContent = JSON.stringify(shown.card, null, 2);
    section.replaceChildren(heading, button("Close", () => (section.hidden = true), "quiet"), pre);
    section.hidden = false;
    section.scrollIntoView();
  } catch (error) {
    showError($("models-error"), error);
  }
}

// One progress bar per stage (downloading, storing, ...), fed by the pull's NDJSON lines.
async function pull(name) {
  if (!name) return;
  const box = $("pull-progress");
  const bars = new Map();
  box.replaceChildren();
  const stage = (event) => {
    const key = `${event.status} ${event.file ?? ""}`;
    if (!bars.has(key)) {
      const label = document.createElement("label");
      const bar = document.createElement("progress");
      const text = document.createElement("span");
      label.textContent = key.trim();
      label.append(bar, text);
      box.append(label);
      bars.set(key, { bar, text });
    }
    const { bar, text } = bars.get(key);
    if (event.total) {
      bar.max = event.total;
      bar.value = event.completed;
      // storing counts bytes; a hub download counts files
      const unit = event.status === "storing" ? bytes : (n) => `${n} files`;
      text.textContent = `${unit(event.completed)} of ${unit(event.total)}`;
    } else bar.removeAttribute("value"); // an indeterminate bar: the size is not known yet
  };
  await change(async () => {
    const response = await call("/api/pull", { method: "POST", body: { model: name, stream: true } });
    for await (const event of ndjson(response)) {
      if (event.error) throw new Error(event.error.message);
      if (event.status === "success") {
        const done = document.createElement("p");
        done.className = "success";
        done.textContent = `Pulled ${event.name} (${event.digest.replace("sha256:", "").slice(0, 12)})`;
        box.append(done);
      } else stage(event);
    }
  }, () => $("pull-form").reset());
}
