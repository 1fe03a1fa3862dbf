// The console's shell: one page shown at a time, picked by the URL's hash (#chat, #models,
// #dashboard, #runs), so the back button and bookmarks work. A page is a module with init (once),
// show (each time it appears: fetch, start polling) and hide (stop polling).

import * as chat from "./chat.js";
import * as dashboard from "./dashboard.js";
import * as models from "./models.js";
import * as runs from "./runs.js";
import { apiKey, askForKey } from "./api.js";

const PAGES = { chat, models, dashboard, runs };
const started = new Set();
let shown = null;

async function route() {
  const name = location.hash.slice(1) in PAGES ? location.hash.slice(1) : "chat";
  if (shown === name) return;
  if (shown) {
    PAGES[shown].hide();
    document.getElementById(`page-${shown}`).hidden = true;
  }
  shown = name;
  for (const link of document.querySelectorAll("nav a")) {
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.getElementById(`page-${name}`).hidden = false;
  document.title = `${name[0].toUpperCase()}${name.slice(1)} · LLMasOS`;
  if (!started.has(name)) {
    started.add(name);
    await PAGES[name].init();
  }
  await PAGES[name].show();
}

function keyButton() {
  const b = document.getElementById("key-button");
  b.textContent = apiKey() ? "Change key" : "API key";
  b.onclick = async () => {
    await askForKey("A key made with `llmasos keys add NAME` (--admin for model changes).");
    keyButton();
    if (shown) {
      PAGES[shown].hide();
      await PAGES[shown].show();
    }
  };
}

window.addEventListener("hashchange", route);
keyButton();
document.getElementById("key-dialog").addEventListener("close", keyButton);
route();
