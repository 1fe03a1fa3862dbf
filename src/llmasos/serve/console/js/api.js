// Calls to the server: the key, errors as OpenAI error objects, and the two stream formats
// (server-sent events for completions, NDJSON for pulls and stats).
//
// The key lives in this tab's sessionStorage and leaves only as an Authorization header: never in a
// URL (which would end up in logs and history). A 401 asks the user for a key and retries once given.

const KEY = "llmasos.apiKey";

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `the server answered ${status}`);
    this.status = status;
    this.code = error?.code ?? null;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY);
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

let asking = null; // one dialog for all the calls that got a 401 at once

// Ask for a key; resolves true when the user gave one, false when they cancelled.
export function askForKey(reason) {
  if (asking) return asking;
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = reason || "";
  input.value = "";
  asking = new Promise((resolve) => {
    const done = (given) => {
      form.removeEventListener("submit", submit);
      dialog.removeEventListener("close", cancel);
      if (dialog.open) dialog.close();
      asking = null;
      resolve(given);
    };
    const submit = (event) => {
      event.preventDefault();
      setApiKey(input.value.trim());
      done(true);
    };
    const cancel = () => done(false);
    form.addEventListener("submit", submit);
    dialog.addEventListener("close", cancel);
    document.getElementById("key-cancel").onclick = cancel;
    dialog.showModal();
    input.focus();
  });
  return asking;
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's page, say; the status speaks
  }
  return new ApiError(response.status, body?.error);
}

// fetch with the key; JSON body in, the Response out (ok), or an ApiError thrown.
export async function call(path, { method = "GET", body, signal } = {}) {
  for (;;) {
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const key = apiKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: "no-store",
    });
    if (response.ok) return response;
    const error = await errorOf(response);
    if (response.status === 401 && (await askForKey(error.message))) continue;
    throw error;
  }
}

export async function getJSON(path, options) {
  return (await call(path, options)).json();
}

async function* chunks(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    yield value;
  }
}

// The JSON objects of an NDJSON body, one per line.
export async function* ndjson(response) {
  let buffer = "";
  for await (const text of chunks(response)) {
    buffer += text;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 1);
      if (line) yield JSON.parse(line);
    }
  }
  if (buffer.trim()) yield JSON.parse(buffer);
}

// The `data:` payloads of a server-sent event stream, parsed as JSON, up to `[DONE]`.
export async function* events(response) {
  let buffer = "";
  for await (const text of chunks(response)) {
    buffer += text.replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}
