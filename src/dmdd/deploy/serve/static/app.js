// dmdd inspection app: talks to the same HTTP API as any client (see /docs). Decisions follow the threshold
// slider in the browser: moving it never re-runs the model.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
let results = [];            // {name, score, overlay_png, ...} of every image inspected so far
let modelThreshold = null;   // the active model's calibrated image threshold
let threshold = null;        // the slider's value
let jobPoll = null;

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers["Authorization"] = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const body = (response.headers.get("content-type") || "").includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error((body && body.detail) || response.statusText);
  return body;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

// ---- tabs
document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => {
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("active", t === tab));
  document.querySelectorAll(".panel").forEach((p) => { p.hidden = p.id !== tab.dataset.tab; });
  if (tab.dataset.tab === "models") loadModels();
}));

// ---- inspect
function addResults(body) {
  modelThreshold = body.image_threshold;
  results = results.concat(body.results);
  if (threshold === null) threshold = modelThreshold;
  render();
}

function render() {
  const scores = results.map((r) => r.score).concat(modelThreshold === null ? [] : [modelThreshold]);
  const slider = $("threshold");
  const enabled = results.length > 0;
  for (const id of ["download-csv", "download-json", "clear", "reset-threshold"]) $(id).disabled = !enabled;
  slider.disabled = !enabled;
  if (enabled) {
    const lo = Math.min(...scores), hi = Math.max(...scores), pad = Math.max((hi - lo) * 0.05, 1e-3);
    slider.min = lo - pad; slider.max = hi + pad; slider.step = (hi - lo + 2 * pad) / 1000;
    slider.value = threshold;
  }
  $("threshold-value").textContent = threshold === null ? "-" : threshold.toFixed(3);
  const sorted = results.slice().sort((a, b) => b.score - a.score);
  const flagged = sorted.filter((r) => r.score >= threshold).length;
  $("counts").textContent = enabled ? `${flagged} of ${results.length} anomalous` : "";
  $("gallery").replaceChildren(...sorted.map((r) => {
    const anomalous = r.score >= threshold;
    const card = document.createElement("figure");
    card.className = "card" + (anomalous ? " anomalous" : "");
    card.dataset.name = r.name;
    card.innerHTML = `<img alt="overlay of ${r.name}" title="click: overlay / mask" class="overlay"
      src="data:image/png;base64,${r.overlay_png}">
      <figcaption><div class="name"></div><span class="score">${r.score.toFixed(3)}</span>
      <span class="decision">${anomalous ? "anomalous" : "good"}</span></figcaption>`;
    card.querySelector(".name").textContent = r.name;
    const img = card.querySelector("img");
    img.addEventListener("click", () => {  // the binary mask at the pixel threshold, and back
      if (!r.mask_png) return;
      const toMask = img.classList.contains("overlay");
      img.src = "data:image/png;base64," + (toMask ? r.mask_png : r.overlay_png);
      img.className = toMask ? "mask" : "overlay";
      img.alt = (toMask ? "mask of " : "overlay of ") + r.name;
    });
    return card;
  }));
}

async function inspectFiles(files) {
  if (!files.length) return;
  status(`scoring ${files.length} image(s)...`);
  const form = new FormData();
  for (const f of files) form.append("files", f);
  try {
    addResults(await api("predict?map=base64", { method: "POST", body: form }));
    status(`${files.length} image(s) scored`);
  } catch (e) { status(e.message, true); }
}

$("file-input").addEventListener("change", (e) => inspectFiles([...e.target.files]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); inspectFiles([...e.dataTransfer.files]); });

$("folder-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  status("scoring the folder...");
  try {
    const body = await api("inspect/folder?map=base64", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ folder: $("folder-input").value }),
    });
    addResults(body);
    status(`${body.results.length} image(s) scored` + (body.failed.length ? `, ${body.failed.length} unreadable` : ""));
  } catch (err) { status(err.message, true); }
});

// folder suggestions: the sub-folders of what has been typed so far (GET /folders, confined to the data root)
async function suggestFolders(e) {
  const typed = e.target.value, parent = typed.includes("/") ? typed.slice(0, typed.lastIndexOf("/")) : "";
  try {
    const body = await api("folders?path=" + encodeURIComponent(parent));
    $("folder-list").replaceChildren(...body.folders.map((f) => {
      const option = document.createElement("option");
      option.value = parent ? `${parent}/${f}` : f;
      return option;
    }));
  } catch (err) { $("folder-list").replaceChildren(); }
}
for (const id of ["folder-input", "train-folder"]) {
  $(id).addEventListener("focus", suggestFolders);
  $(id).addEventListener("input", suggestFolders);
}

$("threshold").addEventListener("input", (e) => { threshold = parseFloat(e.target.value); render(); });
$("reset-threshold").addEventListener("click", () => { threshold = modelThreshold; render(); });
$("clear").addEventListener("click", () => { results = []; threshold = modelThreshold; render(); status(""); });

function download(name, type, text) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], { type }));
  a.download = name;
  a.click();
  URL.revokeObjectURL(a.href);
}

function decisions() {
  return results.map((r) => ({ name: r.name, score: r.score, threshold, anomalous: r.score >= threshold,
    anomalous_area: r.anomalous_area }));
}

$("download-json").addEventListener("click", () =>
  download("dmdd-results.json", "application/json", JSON.stringify(decisions(), null, 1)));
$("download-csv").addEventListener("click", () => {
  const quote = (v) => `"${String(v).replaceAll('"', '""')}"`;
  const rows = decisions().map((d) => [quote(d.name), d.score, d.threshold, d.anomalous, d.anomalous_area].join(","));
  download("dmdd-results.csv", "text/csv", ["name,score,threshold,anomalous,anomalous_area", ...rows].join("\n") + "\n");
});

// ---- models
async function loadModels() {
  try {
    const body = await api("models");
    $("active-model").textContent = body.active ? `model: ${body.active}` : "no model loaded";
    $("model-rows").replaceChildren(...body.models.map((m) => {
      const tr = document.createElement("tr");
      for (const v of [m.name, m.runtime, m.backbone, m.image_size, m.image_threshold, m.pixel_threshold,
                       m.training_data]) {
        const td = document.createElement("td");
        td.textContent = typeof v === "number" ? +v.toFixed(4) : (v ?? "-");
        tr.appendChild(td);
      }
      const td = document.createElement("td");
      if (m.name === body.active) td.textContent = "active";
      else {
        const b = document.createElement("button");
        b.textContent = "activate";
        b.onclick = async () => { await api(`models/${encodeURIComponent(m.name)}/activate`, { method: "POST" });
          results = []; threshold = null; render(); loadModels(); };
        td.appendChild(b);
      }
      tr.appendChild(td);
      return tr;
    }));
  } catch (e) { $("active-model").textContent = e.message; }
}

// ---- train
function showJob(job) {
  $("job").hidden = false;
  $("job-id").textContent = job.id;
  $("job-state").textContent = job.state + (job.model ? ` (model ${job.model} loaded)` : "");
  $("job-progress").value = job.total_steps ? job.step / job.total_steps : 0;
  const losses = Object.entries(job.losses).map(([k, v]) => `${k} ${(+v).toFixed(4)}`).join(", ");
  $("job-detail").textContent = `step ${job.step} of ${job.total_steps || "?"}, ${job.elapsed_s} s` +
    (job.eta_s !== null ? `, about ${Math.round(job.eta_s)} s left` : "") + (losses ? `; ${losses}` : "") +
    (job.error ? `; ${job.error}` : "");
  $("job-log").textContent = job.log_tail.join("\n");
  $("job-stop").disabled = !["running"].includes(job.state);
  if (!["running", "stopping"].includes(job.state)) { clearInterval(jobPoll); jobPoll = null; loadModels(); }
}

$("train-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  try {
    const job = await api("jobs", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ folder: $("train-folder").value, minutes: parseFloat($("train-minutes").value),
                             backbone: $("train-backbone").value }) });
    showJob(job);
    jobPoll = setInterval(async () => showJob(await api(`jobs/${job.id}`)), 1000);
  } catch (err) { $("job").hidden = false; $("job-detail").textContent = err.message; }
});
$("job-stop").addEventListener("click", async () => showJob(await api(`jobs/${$("job-id").textContent}/stop`,
  { method: "POST" })));

loadModels();
render();
