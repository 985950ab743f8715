// dmdd inspection app: talks to the same HTTP API as any client (see /docs). Decisions follow the threshold
// slider in the browser: moving it never re-runs the model. Cards marked good / defect calibrate the thresholds
// (POST /calibrate, the code of `dmdd calibrate`): a preview moves the slider to the rule's threshold and draws the
// labelled scores' histogram and ROC curve with the operating point; saving stores it in the model's checkpoint.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
let results = [];            // {name, score, overlay_png, ...} of every image inspected so far
let modelThreshold = null;   // the active model's calibrated image threshold
let threshold = null;        // the slider's value
let jobPoll = null;
let calibration = null;      // the last POST /calibrate answer: labelled scores, the rule's threshold, the estimate

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
function addResults(body, files = null) {
  modelThreshold = body.image_threshold;
  $("threshold-source").textContent = body.threshold_source ? `(${body.threshold_source})` : "";
  // uploads keep their File to be sent again for calibration; folder images are named by their data-root path
  body.results.forEach((r, i) => { r.label = null; if (files) r.file = files[i]; else r.path = r.name; });
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
      <span class="decision">${anomalous ? "anomalous" : "good"}</span>
      <div class="labels">label: <button data-label="0">good</button><button data-label="1">defect</button></div>
      </figcaption>`;
    card.querySelector(".name").textContent = r.name;
    card.querySelectorAll(".labels button").forEach((b) => {
      b.classList.toggle("on", r.label === +b.dataset.label);
      b.addEventListener("click", () => { r.label = r.label === +b.dataset.label ? null : +b.dataset.label; render(); });
    });
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
  const good = results.filter((r) => r.label === 0).length, bad = results.filter((r) => r.label === 1).length;
  $("label-counts").textContent = `${good} good, ${bad} defect`;
  $("calibrate-preview").disabled = $("calibrate-save").disabled = !(good && bad && good + bad >= 3);
  drawCalibration();
}

// ---- calibrate from labelled cards
$("rule").addEventListener("change", () => { $("rate-label").hidden = $("rule").value === "f1"; });

async function calibrate(save) {
  const form = new FormData();
  for (const r of results.filter((x) => x.label !== null)) {
    const kind = r.label === 1 ? "defective" : "good";
    if (r.file) form.append(kind, r.file, r.name); else form.append(kind + "_paths", r.path);
  }
  const rule = $("rule").value === "f1" ? "f1" : `${$("rule").value}=${$("rate").value}`;
  try {
    calibration = await api(`calibrate?rule=${encodeURIComponent(rule)}&save=${save}`, { method: "POST", body: form });
    threshold = calibration.labelled.image;
    if (save) { modelThreshold = calibration.image_threshold; $("threshold-source").textContent = `(${calibration.threshold_source})`; loadModels(); }
    const est = calibration.labelled.estimate, pct = (x) => (100 * x).toFixed(0) + " %";
    const ci = (p) => `${pct(p[0])}-${pct(p[1])}`;
    $("calibration-text").textContent = `${save ? "Saved" : "Preview"}: rule ${rule}, threshold ${threshold.toFixed(3)}. ` +
      `Expected on new parts (${est.method}): recall ${pct(est.recall)} (95 % ${ci(est.recall_95ci)}), ` +
      `false alarms ${pct(est.false_alarm_rate)} (95 % ${ci(est.false_alarm_95ci)}).` +
      (save ? "" : " Nothing is stored until you save.");
    render();
  } catch (e) { $("calibration-text").textContent = e.message; }
}
$("calibrate-preview").addEventListener("click", () => calibrate(false));
$("calibrate-save").addEventListener("click", () => calibrate(true));

function drawCalibration() {
  const hist = $("histogram"), roc = $("roc");
  for (const c of [hist, roc]) c.getContext("2d").clearRect(0, 0, c.width, c.height);
  if (!calibration || !calibration.scores.length) return;
  const s = calibration.scores, ruleT = calibration.labelled.image;
  const values = s.map((x) => x.score).concat([ruleT, threshold]);
  const lo = Math.min(...values), hi = Math.max(...values), span = hi - lo || 1, bins = 30;
  const x = (v) => 10 + (hist.width - 20) * (v - lo) / span;
  const counts = [0, 1].map((label) => {
    const c = new Array(bins).fill(0);
    for (const p of s.filter((q) => q.label === label)) c[Math.min(bins - 1, Math.floor(bins * (p.score - lo) / span))]++;
    return c;
  });
  const top = Math.max(1, ...counts[0], ...counts[1]), h = hist.getContext("2d"), w = (hist.width - 20) / bins;
  [["rgba(60,150,60,0.6)", counts[0]], ["rgba(210,50,50,0.6)", counts[1]]].forEach(([colour, c]) => {
    h.fillStyle = colour;
    c.forEach((n, i) => h.fillRect(10 + i * w, hist.height - 15 - (hist.height - 30) * n / top, w - 1, (hist.height - 30) * n / top));
  });
  const line = (v, dash) => { h.setLineDash(dash); h.strokeStyle = "#222"; h.beginPath(); h.moveTo(x(v), 5); h.lineTo(x(v), hist.height - 15); h.stroke(); };
  line(ruleT, [4, 3]); line(threshold, []);
  // ROC of the labelled scores: every threshold, and the slider's point on it
  const good = s.filter((q) => q.label === 0).map((q) => q.score), bad = s.filter((q) => q.label === 1).map((q) => q.score);
  const rate = (list, t) => list.filter((v) => v >= t).length / list.length;
  const cuts = [Infinity, ...values.slice(0, s.length).sort((a, b) => b - a), -Infinity];
  const r = roc.getContext("2d"), px = (f) => 10 + (roc.width - 20) * f, py = (t) => roc.height - 10 - (roc.height - 20) * t;
  r.strokeStyle = "#ccc"; r.strokeRect(10, 10, roc.width - 20, roc.height - 20);
  r.strokeStyle = "#24323f"; r.beginPath();
  cuts.forEach((t, i) => (i ? r.lineTo : r.moveTo).call(r, px(rate(good, t)), py(rate(bad, t))));
  r.stroke();
  r.fillStyle = "#d33"; r.beginPath(); r.arc(px(rate(good, threshold)), py(rate(bad, threshold)), 5, 0, 2 * Math.PI); r.fill();
}

async function inspectFiles(files) {
  if (!files.length) return;
  status(`scoring ${files.length} image(s)...`);
  const form = new FormData();
  for (const f of files) form.append("files", f);
  try {
    addResults(await api("predict?map=base64", { method: "POST", body: form }), files);
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
$("clear").addEventListener("click", () => {
  results = []; calibration = null; threshold = modelThreshold; $("calibration-text").textContent = ""; render(); status("");
});

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
                       m.threshold_source, m.training_data]) {
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
                             backbone: $("train-backbone").value, tile: parseInt($("train-tile").value) || null }) });
    showJob(job);
    jobPoll = setInterval(async () => showJob(await api(`jobs/${job.id}`)), 1000);
  } catch (err) { $("job").hidden = false; $("job-detail").textContent = err.message; }
});
$("job-stop").addEventListener("click", async () => showJob(await api(`jobs/${$("job-id").textContent}/stop`,
  { method: "POST" })));

loadModels();
render();
