// Runs: each training run's loss curve (train, and eval where it was measured) from its metrics.jsonl,
// and the evaluation results recorded in model cards; both from GET /api/runs.

import { LineChart } from "./chart.js";
import { count, fillTable, showError } from "./format.js";
import { getJSON } from "./api.js";

const $ = (id) => document.getElementById(id);
let charts = [];

export function init() {}

export async function show() {
  try {
    draw(await getJSON("/api/runs"));
    showError($("runs-error"), null);
  } catch (error) {
    showError($("runs-error"), error);
  }
}

export function hide() {
  for (const chart of charts) chart.destroy();
  charts = [];
  $("runs-list").replaceChildren();
}

function last(records, key) {
  for (let i = records.length - 1; i >= 0; i -= 1) if (key in records[i]) return records[i][key];
  return undefined;
}

function draw({ runs, evaluations }) {
  hide();
  if (!runs.length) {
    const p = document.createElement("p");
    p.className = "muted";
    p.textContent = "No training runs yet: `llmasos finetune`, `pretrain` and `dpo` write them under runs/.";
    $("runs-list").append(p);
  }
  for (const run of runs) {
    const article = document.createElement("article");
    article.className = "run";
    const heading = document.createElement("h2");
    heading.textContent = run.name;
    const facts = document.createElement("p");
    facts.className = "muted";
    const loss = last(run.records, "loss");
    const evalLoss = last(run.records, "eval_loss");
    facts.textContent = [
      run.path,
      `step ${last(run.records, "step") ?? 0}`,
      loss === undefined ? null : `train loss ${loss.toFixed(4)}`,
      evalLoss === undefined ? null : `eval loss ${evalLoss.toFixed(4)}`,
      `${count(last(run.records, "tokens") ?? 0)} tokens`,
    ].filter(Boolean).join(" · ");
    const plot = document.createElement("div");
    plot.className = "chart";
    plot.setAttribute("role", "img");
    plot.setAttribute("aria-label", `Loss of ${run.name} by step`);
    article.append(heading, facts, plot);
    $("runs-list").append(article);
    // one x per step; a step's train and eval records merge, and a series has gaps where it is absent
    const byStep = new Map();
    for (const record of run.records) byStep.set(record.step, { ...byStep.get(record.step), ...record });
    const steps = [...byStep.keys()].sort((a, b) => a - b);
    const at = (key) => steps.map((step) => byStep.get(step)[key] ?? null);
    const chart = new LineChart(plot, {
      series: [{ label: "train loss" }, { label: "eval loss", points: true }],
      xLabel: "step",
      yLabel: "loss",
    });
    chart.setData(steps, [at("loss"), at("eval_loss")]);
    charts.push(chart);
  }
  fillTable(
    $("evals-table"),
    evaluations.map((e) => [
      e.model,
      e.task,
      e.kind,
      Object.entries(e.metrics).map(([k, v]) => `${k} ${Number(v).toFixed(4)}`).join(", "),
      e.num_examples,
      e.recorded,
    ]),
    "No evaluation is recorded: `llmasos eval MODEL TASK` records one in the model's card.",
  );
}
