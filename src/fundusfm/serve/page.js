// fundusfm serve: drop photographs, see each one's row, download them as CSV.
// Plain JavaScript, no build step and nothing loaded from elsewhere. Each file is sent to
// POST /v1/predict (as many at a time as the server scores at once: max_concurrent); a
// refused file gets a row with the error the API names. Rows are coloured as report.html
// colours them (the row's `tone`, the report's colours in /static/tones.css) and a shifted
// row is highlighted. The CSV is written by the server (POST /v1/csv), with the pandas call
// of `fundusfm predict`, so that it is predict's predictions.csv text for text.
"use strict";

const state = { model: null, rows: [], queue: [], running: 0 };
const ready = fetch("/v1/model").then((r) => r.json()).then(showModel).catch((err) => {
  document.getElementById("model-summary").textContent = `cannot read /v1/model: ${err}`;
  throw err;
});

function el(tag, attrs = {}, text = "") {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== "") node.textContent = text;
  return node;
}

function showModel(info) {
  state.model = info;
  document.getElementById("model-summary").textContent =
    `${info.name}: ${info.task.kind}, classes ${info.classes.join(", ")}; ` +
    `decision at the ${info.threshold.words}; ` +
    `${info.preprocessing.resolution} px; engine ${info.server.engine}`;
  const notes = document.getElementById("model-notes");
  for (const note of info.notes) notes.appendChild(el("li", {}, note));
  document.getElementById("model-card").textContent = info.card;
  const head = document.getElementById("results-head");
  for (const col of columns()) head.appendChild(el("th", {}, col.label));
  return info;
}

function columns() {
  const probs = state.model.classes.map((c) => ({ key: `p_${c}`, label: `p(${c})`, num: true }));
  return [
    { key: "file", label: "file" }, { key: "status", label: "status" },
    { key: "reason", label: "reason" }, ...probs, { key: "decision", label: "decision" },
    { key: "shift", label: "shift" }, { key: "gradcam_png", label: "Grad-CAM" },
  ];
}

function cell(col, row) {
  const td = el("td", { "data-col": col.key });
  const value = row[col.key];
  if (col.key === "decision") td.className = "decision";
  if (col.key === "shift" && value === "shifted") td.className = "shifted flag";
  if (col.key === "gradcam_png") {
    if (value) td.appendChild(el("img", { src: `data:image/png;base64,${value}`, alt: "Grad-CAM" }));
  } else if (col.num && typeof value === "number") {
    td.className = "num";
    td.setAttribute("data-value", String(value));
    td.textContent = value.toFixed(3);
  } else {
    td.textContent = value == null ? "" : String(value);
  }
  return td;
}

// The report's colour class of a finished row: the API's `tone` (pos, neg, ungradable),
// else the refusal's (unsupported, or unreadable: grey, not scored).
function tone(entry) {
  if (entry.row.tone) return entry.row.tone;
  return entry.row.status === "unsupported" ? "unsupported" : "unreadable";
}

function draw(entry) {
  const tr = entry.tr;
  tr.replaceChildren(...columns().map((col) => cell(col, entry.row)));
  tr.className = entry.done ? tone(entry) : "pending";
  if (!entry.done) return;
  tr.setAttribute("data-done", "1");
  tr.setAttribute("data-tone", tone(entry));
  tr.setAttribute("data-shift", entry.row.shift || "");
}

async function score(entry) {
  const form = new FormData();
  form.append("file", entry.file, entry.file.name);
  const gradcam = state.model.server.gradcam ? "?gradcam=true" : "";
  try {
    const response = await fetch(`/v1/predict${gradcam}`, { method: "POST", body: form });
    const body = await response.json();
    entry.ok = response.ok;
    entry.row = response.ok ? body : {
      file: body.file || entry.file.name, status: body.error || `HTTP ${response.status}`,
      reason: body.detail || "",
    };
  } catch (err) {
    entry.ok = false;
    entry.row = { file: entry.file.name, status: "error", reason: String(err) };
  }
  entry.done = true;
  draw(entry);
}

function pump() {
  while (state.running < state.model.server.max_concurrent && state.queue.length) {
    const entry = state.queue.shift();
    state.running += 1;
    score(entry).finally(() => { state.running -= 1; progress(); pump(); });
  }
}

function progress() {
  const done = state.rows.filter((e) => e.done).length;
  document.getElementById("progress").textContent =
    state.rows.length ? `${done} of ${state.rows.length} screened` : "";
  document.getElementById("download").disabled = done === 0;
  document.getElementById("clear").disabled = state.rows.length === 0 || done < state.rows.length;
}

async function add(files) {
  await ready;
  const body = document.querySelector("#results tbody");
  for (const file of files) {
    const entry = { file, row: { file: file.name, status: "pending" }, done: false, ok: false };
    entry.tr = el("tr", { "data-file": file.name });
    body.appendChild(entry.tr);
    draw(entry);
    state.rows.push(entry);
    state.queue.push(entry);
  }
  progress();
  pump();
}

// predictions.csv of the finished rows, written by the server as `fundusfm predict` writes it
async function csv() {
  const rows = state.rows.filter((e) => e.done).map((e) => {
    const { gradcam_png: _, ...row } = e.row;  // the overlay is not a column
    return row;
  });
  const response = await fetch("/v1/csv", {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ rows }),
  });
  if (!response.ok) throw new Error((await response.json()).detail);
  return response.text();
}

async function download() {
  let text;
  try {
    text = await csv();
  } catch (err) {
    document.getElementById("progress").textContent = `cannot write the CSV: ${err.message}`;
    return;
  }
  const url = URL.createObjectURL(new Blob([text], { type: "text/csv" }));
  const link = el("a", { href: url, download: "predictions.csv" });
  document.body.appendChild(link);
  link.click();
  link.remove();
  URL.revokeObjectURL(url);
}

function clear() {
  state.rows = [];
  document.querySelector("#results tbody").replaceChildren();
  progress();
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = document.getElementById("drop");
  const input = document.getElementById("files");
  input.addEventListener("change", () => { add([...input.files]); input.value = ""; });
  for (const kind of ["dragenter", "dragover"]) {
    drop.addEventListener(kind, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    add([...e.dataTransfer.files]);
  });
  document.getElementById("download").addEventListener("click", download);
  document.getElementById("clear").addEventListener("click", clear);
});
