// Chat: a model, a conversation, streamed answers. An answer streams over POST /v1/chat/completions
// (stream: true, usage in the last event) and is drawn as sanitized Markdown as it arrives; each
// answer keeps its figures: time to first token, tokens/s, prompt tokens and how many of them the
// prefix cache held. Conversations live in IndexedDB (conversations.js).

import { ApiError, call, events, getJSON } from "./api.js";
import { deleteConversation, listConversations, newConversation, saveConversation } from "./conversations.js";
import { button, showError } from "./format.js";
import { renderAnswer } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const SETTINGS = {
  system: "set-system",
  temperature: "set-temperature",
  top_p: "set-top-p",
  max_tokens: "set-max-tokens",
  seed: "set-seed",
  schema: "set-schema",
};

let conversations = [];
let current = null;
let streaming = null; // the AbortController of the answer being streamed

export async function init() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => streaming?.abort());
  $("new-chat").addEventListener("click", () => open(newConversation(readSettings())));
  $("chat-model").addEventListener("change", storeSettings);
  for (const id of [...Object.values(SETTINGS), "set-json"]) $(id).addEventListener("change", storeSettings);
  $("conversations-toggle").addEventListener("click", () => {
    const shown = $("conversations").classList.toggle("shown");
    $("conversations-toggle").setAttribute("aria-expanded", String(shown));
  });
  conversations = await listConversations();
  open(conversations[0] ?? newConversation(readSettings()));
}

export async function show() {
  const select = $("chat-model");
  try {
    const { data } = await getJSON("/v1/models");
    const wanted = current?.settings.model || select.value;
    select.replaceChildren(
      ...data.map((model) => new Option(model.id, model.id, false, model.id === wanted)),
    );
    if (!data.length) select.append(new Option("no models: pull one on the Models page", ""));
    showError($("chat-error"), null);
  } catch (error) {
    showError($("chat-error"), error);
  }
  $("prompt").focus();
}

export function hide() {}

function readSettings() {
  const settings = { model: $("chat-model").value, json: $("set-json").checked };
  for (const [name, id] of Object.entries(SETTINGS)) settings[name] = $(id).value;
  return settings;
}

function writeSettings(settings) {
  for (const [name, id] of Object.entries(SETTINGS)) $(id).value = settings[name] ?? "";
  $("set-json").checked = Boolean(settings.json);
  if (settings.model && [...$("chat-model").options].some((o) => o.value === settings.model)) {
    $("chat-model").value = settings.model;
  }
}

function storeSettings() {
  current.settings = readSettings();
  if (current.messages.length) saveConversation(current);
}

function open(conversation) {
  if (streaming) return;
  current = conversation;
  writeSettings(current.settings);
  drawSidebar();
  drawMessages();
  $("conversations").classList.remove("shown");
}

function drawSidebar() {
  const items = conversations.map((conversation) => {
    const li = document.createElement("li");
    const pick = button(conversation.title, () => open(conversation), "conversation");
    if (conversation === current) pick.setAttribute("aria-current", "true");
    const remove = button("×", async () => {
      await deleteConversation(conversation.id);
      conversations = conversations.filter((c) => c !== conversation);
      if (conversation === current) open(conversations[0] ?? newConversation(readSettings()));
      else drawSidebar();
    }, "quiet remove");
    remove.setAttribute("aria-label", `Delete conversation ${conversation.title}`);
    li.append(pick, remove);
    return li;
  });
  $("conversation-list").replaceChildren(...items);
}

function drawMessages() {
  $("messages").replaceChildren(...current.messages.map(messageItem));
  scrollDown();
}

function scrollDown() {
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

function messageItem(message, index) {
  const li = document.createElement("li");
  li.className = `message ${message.role}`;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = message.role === "user" ? "You" : message.model || "assistant";
  const content = document.createElement("div");
  content.className = "content";
  drawContent(content, message);
  const meta = document.createElement("div");
  meta.className = "meta";
  const stats = document.createElement("span");
  stats.className = "stats";
  stats.textContent = statsText(message);
  meta.append(stats);
  const last = index === current.messages.length - 1;
  if (message.role === "user") meta.append(button("Edit", () => edit(li, index), "quiet"));
  if (message.role === "assistant" && last) meta.append(button("Regenerate", regenerate, "quiet"));
  li.append(who, content, meta);
  return li;
}

function drawContent(element, message) {
  if (message.role === "user") element.textContent = message.content;
  else renderAnswer(element, message.content, message.structured);
}

function statsText(message) {
  const s = message.stats;
  if (!s) return "";
  const parts = [];
  if (s.ttft_s !== undefined) parts.push(`TTFT ${Math.round(s.ttft_s * 1000)} ms`);
  if (s.tokens_per_s !== undefined) parts.push(`${s.tokens_per_s.toFixed(1)} tokens/s`);
  if (s.prompt_tokens !== undefined) {
    parts.push(`prompt ${s.prompt_tokens} tokens (${s.cached_tokens ?? 0} from the prefix cache)`);
  }
  if (s.completion_tokens !== undefined) parts.push(`${s.completion_tokens} tokens`);
  if (s.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function edit(li, index) {
  if (streaming) return;
  const content = li.querySelector(".content");
  const area = document.createElement("textarea");
  area.value = current.messages[index].content;
  area.rows = Math.min(12, area.value.split("\n").length + 1);
  area.setAttribute("aria-label", "Edit message");
  const save = button("Send", () => {
    if (!area.value.trim()) return;
    current.messages = current.messages.slice(0, index);
    current.messages.push({ role: "user", content: area.value });
    drawMessages();
    answer();
  });
  const cancel = button("Cancel", drawMessages, "quiet");
  content.replaceChildren(area, save, cancel);
  area.focus();
}

function regenerate() {
  if (streaming) return;
  current.messages.pop();
  drawMessages();
  answer();
}

async function send() {
  const text = $("prompt").value;
  if (!text.trim() || streaming) return;
  $("prompt").value = "";
  current.messages.push({ role: "user", content: text });
  if (current.messages.length === 1) current.title = text.slice(0, 60);
  if (!conversations.includes(current)) conversations.unshift(current);
  drawSidebar();
  drawMessages();
  answer();
}

// The request body for the conversation so far, with its settings.
function requestBody(settings) {
  const messages = current.messages.map(({ role, content }) => ({ role, content }));
  if (settings.system.trim()) messages.unshift({ role: "system", content: settings.system });
  const body = { model: settings.model, messages, stream: true, stream_options: { include_usage: true } };
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) {
    if (settings[name] !== "") body[name] = Number(settings[name]);
  }
  if (settings.json) {
    if (!settings.schema.trim()) body.response_format = { type: "json_object" };
    else {
      let schema;
      try {
        schema = JSON.parse(settings.schema);
      } catch (error) {
        throw new Error(`the JSON schema is not valid JSON: ${error.message}`);
      }
      body.response_format = { type: "json_schema", json_schema: { name: "answer", schema } };
    }
  }
  return body;
}

// Stream the model's answer to the conversation as it stands.
async function answer() {
  const settings = (current.settings = readSettings());
  showError($("chat-error"), null);
  let body;
  try {
    if (!settings.model) throw new Error("pick a model first (the Models page pulls and loads them)");
    body = requestBody(settings);
  } catch (error) {
    showError($("chat-error"), error);
    return;
  }
  const message = { role: "assistant", content: "", model: settings.model, structured: settings.json, stats: {} };
  current.messages.push(message);
  setStreaming(new AbortController()); // before any await: a second Enter cannot start a second answer
  drawMessages();
  const item = $("messages").lastElementChild;
  const content = item.querySelector(".content");
  item.classList.add("streaming");
  await saveConversation(current);

  let drawing = false;
  const draw = () => {
    if (drawing) return;
    drawing = true;
    requestAnimationFrame(() => {
      drawing = false;
      drawContent(content, message);
      scrollDown();
    });
  };
  const started = performance.now();
  let first = null;
  let usage = null;
  let failure = null;
  try {
    const response = await call("/v1/chat/completions", { method: "POST", body, signal: streaming.signal });
    for await (const chunk of events(response)) {
      if (chunk.error) throw new ApiError(500, chunk.error);
      const text = chunk.choices?.[0]?.delta?.content;
      if (text) {
        first ??= performance.now();
        message.content += text;
        draw();
      }
      if (chunk.usage) usage = chunk.usage;
    }
  } catch (error) {
    if (error.name === "AbortError") message.stats.stopped = true;
    else failure = error;
  }
  const ended = performance.now();
  if (first !== null) message.stats.ttft_s = (first - started) / 1000;
  if (usage) {
    message.stats.prompt_tokens = usage.prompt_tokens;
    message.stats.cached_tokens = usage.prompt_tokens_details?.cached_tokens ?? 0;
    message.stats.completion_tokens = usage.completion_tokens;
    if (first !== null && usage.completion_tokens > 1 && ended > first) {
      // the tokens after the first, over the time they took: the decode rate the user sees
      message.stats.tokens_per_s = (usage.completion_tokens - 1) / ((ended - first) / 1000);
    }
  }
  if (failure && !message.content) current.messages.pop();
  await saveConversation(current);
  setStreaming(null);
  drawSidebar();
  drawMessages();
  showError($("chat-error"), failure);
}

// While an answer streams: Stop instead of Send, and the list of messages marked busy.
function setStreaming(controller) {
  streaming = controller;
  $("send").hidden = Boolean(controller);
  $("stop").hidden = !controller;
  $("messages").setAttribute("aria-busy", String(Boolean(controller)));
  if (controller) $("stop").focus();
  else $("prompt").focus();
}
