// Dashboard: the server's live numbers from GET /api/stats/stream (one JSON snapshot a second, as
// server-sent events read with fetch, since EventSource cannot send the key's header). Every field is
// read defensively: a server that lacks one shows "–", not a broken page.

import { events, call } from "./api.js";
import { LineChart } from "./chart.js";
import { count, duration, fillTable, ms, percent, showError, speculation } from "./format.js";

const $ = (id) => document.getElementById(id);
const RETRY_MS = 2000;

let reading = null; // the AbortController of the open stream
let chart = null;

export function init() {}

export function show() {
  chart ??= new LineChart($("dash-chart"), {
    series: [{ label: "prefill" }, { label: "from prefix cache" }, { label: "decode" }],
    xLabel: "time",
    yLabel: "tokens/s",
    time: true,
  });
  follow();
}

export function hide() {
  reading?.abort();
  reading = null;
}

async function follow() {
  hide();
  const controller = (reading = new AbortController());
  while (!controller.signal.aborted) {
    try {
      const response = await call("/api/stats/stream", { signal: controller.signal });
      for await (const snapshot of events(response)) {
        draw(snapshot);
        showError($("dashboard-error"), null);
      }
    } catch (error) {
      if (controller.signal.aborted) return;
      showError($("dashboard-error"), error);
      if (error.status === 401 || error.status === 403) return; // the key was refused: no retry loop
    }
    await new Promise((resolve) => setTimeout(resolve, RETRY_MS));
  }
}

function tile(label, value, name) {
  const div = document.createElement("div");
  div.className = "tile";
  div.dataset.name = name;
  const number = document.createElement("strong");
  number.textContent = value;
  const caption = document.createElement("span");
  caption.textContent = label;
  div.append(number, caption);
  return div;
}

function draw(s) {
  const requests = s.requests ?? {};
  const rates = s.tokens?.per_s ?? {};
  const rate = (x) => (x === undefined ? "–" : count(x));
  $("dash-tiles").replaceChildren(
    tile("running", count(requests.running), "running"),
    tile("waiting", count(requests.waiting), "waiting"),
    tile("prefill tokens/s", rate(rates.prefill), "prefill"),
    tile("decode tokens/s", rate(rates.decode), "decode"),
    tile("prefix-cache hit rate", percent(s.prefix_cache_hit_rate), "hit-rate"),
    tile("requests admitted", count(requests.admitted), "admitted"),
    tile("rate limited (429)", count(requests.rate_limited), "rate-limited"),
    tile("uptime", duration(s.uptime_s), "uptime"),
  );

  const tokens = s.tokens ?? {};
  const points = tokens.decode?.length ?? 0;
  if (points) {
    const step = tokens.resolution_s ?? 1;
    const now = s.time ?? Date.now() / 1000;
    // the window's seconds since the server started (before it, the zeros are not measurements)
    const shown = Math.max(2, Math.min(points, Math.ceil((s.uptime_s ?? Infinity) / step) + 1));
    const times = Array.from({ length: shown }, (_, i) => now - (shown - 1 - i) * step);
    const series = ["prefill", "cached", "decode"].map((name) => (tokens[name] ?? []).slice(-shown));
    chart.setData(times, series);
  }

  fillTable(
    $("dash-models"),
    (s.models ?? []).map((m) => {
      const kv = m.kv_blocks;
      const blocks = (n) => (kv ? `${n} of ${kv.total}` : "–");
      return [m.model, m.running, m.waiting, m.preemptions, blocks(kv?.used), blocks(kv?.cached), blocks(kv?.free),
        speculation(m.speculative)];
    }),
    "No model is loaded.",
  );

  const latency = s.latency ?? {};
  fillTable(
    $("dash-latency"),
    [
      ["time to first token", latency.ttft_s],
      ["inter-token latency", latency.itl_s],
    ].map(([label, p]) => [label, ms(p?.p50), ms(p?.p90), ms(p?.p99)]),
    "",
  );

  fillTable(
    $("dash-keys"),
    (s.keys ?? []).map((k) => [
      k.key ?? "(open server)",
      count(k.requests),
      count(k.tokens),
      count(k.rate_limited),
      k.budget_left === null || k.budget_left === undefined ? "no budget" : count(k.budget_left),
    ]),
    "No calls yet.",
  );

  const guards = s.guards ?? {};
  const actions = (counts) => Object.entries(counts).map(([action, n]) => `${action} ${n}`).join(", ");
  fillTable(
    $("dash-guards"),
    Object.entries(guards.categories ?? {}).map(([category, counts]) => [category, actions(counts)]),
    guards.enabled === false ? "The guards are off (llmasos serve --guard-policy turns them on)." : "No verdicts yet.",
  );
}
