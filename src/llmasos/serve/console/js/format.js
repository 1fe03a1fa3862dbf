// Small helpers shared by the pages: numbers as people read them, and table rows from values.

export function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
}

export function count(n) {
  if (n === null || n === undefined) return "–";
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)}B`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)}M`;
  if (n >= 1e4) return `${(n / 1e3).toFixed(0)}K`;
  return String(Math.round(n * 100) / 100);
}

export function percent(x) {
  return x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`;
}

// Speculative decoding of a loaded model (its /api/ps row's `speculative`): "off" when its engine does
// not draft; otherwise the share of drafted tokens kept and the tokens gained per verify forward.
export function speculation(spec) {
  if (!spec) return "off";
  if (!spec.num_drafts) return "no drafts yet";
  return `${percent(spec.acceptance_rate)} accepted, ${spec.tokens_per_forward.toFixed(2)} tok/forward`;
}

export function ms(seconds) {
  return seconds === null || seconds === undefined ? "–" : `${Math.round(seconds * 1000)} ms`;
}

export function duration(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  const s = Math.max(0, Math.round(seconds));
  return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

// A <tr> of cells; a cell is text, or a Node put in as it is.
export function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.append(cell);
    else td.textContent = cell === null || cell === undefined ? "–" : String(cell);
    tr.append(td);
  }
  return tr;
}

export function fillTable(table, rows, empty) {
  const body = table.querySelector("tbody");
  if (rows.length) body.replaceChildren(...rows.map(row));
  else {
    const tr = row([empty]);
    tr.firstChild.colSpan = table.querySelectorAll("thead th").length;
    tr.className = "muted";
    body.replaceChildren(tr);
  }
}

export function button(label, onClick, className = "") {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

// Show an error (an ApiError's message: the server's, which says what to do) in a page's alert line.
export function showError(element, error) {
  element.textContent = error ? error.message : "";
  element.hidden = !error;
}
