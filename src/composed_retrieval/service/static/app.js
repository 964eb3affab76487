// Composed image search page: no framework, no build step, talks to the JSON API of `cir serve`.
"use strict";

const $ = (id) => document.getElementById(id);
// ref: the current reference, {file, name, preview}; steps: searches done, each
// {ref, text, data}; current: the step shown (-1: none).
const state = { ref: null, galleryOffset: 0, busy: false, steps: [], current: -1, maxText: 500 };
const PAGE = 40;

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function showNote(message) {
  const note = $("text-note");
  note.textContent = message || "";
  note.hidden = !message;
}

// ---- reference -------------------------------------------------------------------------------
function showReference(ref) {
  state.ref = ref;
  const img = $("ref-img"), hint = $("drop-hint"), label = $("ref-label");
  if (!ref) {
    img.removeAttribute("src"); img.hidden = true; hint.hidden = false;
    $("no-preview").hidden = true;
    label.textContent = "No reference yet"; label.dataset.name = "";
    return;
  }
  $("no-preview").hidden = true;
  img.hidden = false; hint.hidden = true;
  img.src = ref.preview;
  label.textContent = ref.file ? `Uploaded: ${ref.file.name}` : `Gallery: ${ref.name}`;
  label.dataset.name = ref.name || "";
}

function refPreviewFailed() {
  // the browser cannot show this file (corrupt, or a format it does not know): no broken-image
  // icon; the server decodes uploads itself and says what is wrong if it cannot either
  const img = $("ref-img");
  if (!img.getAttribute("src")) return;
  img.hidden = true;
  $("drop-hint").hidden = true;
  $("no-preview").hidden = false;
  if (state.ref && state.ref.file) $("ref-label").textContent = `Uploaded: ${state.ref.file.name} (no preview)`;
}

function setReferenceFile(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) { showError(`${file.name} is not an image`); return; }
  showReference({ file, name: null, preview: URL.createObjectURL(file) });
  showError("");
}

function setReferenceName(name, thumbnailUrl) {
  showReference({ file: null, name, preview: thumbnailUrl });
  showError("");
  const text = $("text");
  text.focus(); text.select();
}

// ---- cards -----------------------------------------------------------------------------------
function thumb(src, alt) {
  const img = document.createElement("img");
  img.src = src; img.alt = alt; img.loading = "lazy";
  img.addEventListener("error", () => {
    const box = document.createElement("span");
    box.className = "no-thumb"; box.textContent = "no preview";
    img.replaceWith(box);
  }, { once: true });
  return img;
}

function card(item, onClick, extra, withViewer) {
  const box = document.createElement("div");
  box.className = "card";
  box.dataset.name = item.name;
  const pick = document.createElement("button");
  pick.type = "button"; pick.className = "pick";
  pick.title = `${item.name} — use as reference`;
  pick.appendChild(thumb(item.thumbnail_url, item.name));
  if (extra) pick.appendChild(extra);
  const caption = document.createElement("span");
  caption.className = "name"; caption.textContent = item.name;
  pick.appendChild(caption);
  pick.addEventListener("click", () => onClick(item));
  box.appendChild(pick);
  if (withViewer) {
    const full = document.createElement("button");
    full.type = "button"; full.className = "full";
    full.title = `View ${item.name} full size`; full.setAttribute("aria-label", full.title);
    full.textContent = "⤢";
    full.addEventListener("click", () => openViewer(item));
    box.appendChild(full);
  }
  return box;
}

function pickFromGrid(item) {
  setReferenceName(item.name, item.thumbnail_url);
  window.scrollTo({ top: 0, behavior: "smooth" });
}

// ---- full-size viewer: looks at a result, leaves the reference alone --------------------------
function openViewer(item) {
  const dialog = $("viewer");
  $("viewer-img").src = item.image_url;
  $("viewer-img").alt = item.name;
  $("viewer-name").textContent = item.name;
  $("viewer-open").href = item.image_url;
  $("viewer-use").onclick = () => { dialog.close(); pickFromGrid(item); };
  dialog.showModal();
}

// ---- results and steps -----------------------------------------------------------------------
function clearResults() {
  $("results").replaceChildren();
  $("results-title").textContent = "Results";
  $("results-section").hidden = true;
}

function renderResults(data) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of data.results) {
    const meta = document.createElement("span");
    meta.className = "meta";
    const rank = document.createElement("b"); rank.textContent = `#${hit.rank}`;
    const score = document.createElement("span"); score.className = "score"; score.textContent = hit.score.toFixed(3);
    meta.append(rank, score);
    grid.appendChild(card(hit, pickFromGrid, meta, true));
  }
  $("results-title").textContent = `Results for “${data.text}”`;
  $("results-section").hidden = false;
  if (!data.results.length) grid.textContent = "No results.";
}

function refLabel(ref) { return ref.name || (ref.file && ref.file.name) || "reference"; }

function renderSteps() {
  const list = $("history");
  list.replaceChildren();
  state.steps.forEach((step, i) => {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button"; button.className = "step";
    button.textContent = `${refLabel(step.ref)} → “${step.text}”`;
    button.title = "Go back to this step";
    if (i === state.current) { li.classList.add("current"); button.setAttribute("aria-current", "step"); }
    button.addEventListener("click", () => goToStep(i));
    li.appendChild(button);
    list.appendChild(li);
  });
  $("steps").hidden = !state.steps.length;
}

function goToStep(i) {
  const step = state.steps[i];
  state.current = i;
  showReference(step.ref);
  $("text").value = step.text;
  showError(""); showNote("");
  renderResults(step.data);
  renderSteps();
}

function undo() {
  if (!state.steps.length) return;
  const dropped = state.steps.splice(Math.max(0, state.current));   // the step shown and any after it
  if (state.steps.length) { goToStep(state.steps.length - 1); return; }
  state.current = -1;
  showReference(dropped[0].ref);
  $("text").value = dropped[0].text;
  clearResults();
  renderSteps();
}

function reset() {
  state.steps = []; state.current = -1;
  showReference(null);
  $("text").value = "";
  showError(""); showNote("");
  clearResults();
  renderSteps();
}

async function search(event) {
  if (event) event.preventDefault();
  const text = $("text").value.trim();
  const ref = state.ref;
  if (!ref) { showError("Choose a reference image first."); return; }
  if (!text) { showError("Describe what should change."); $("text").focus(); return; }
  if (state.busy) return;
  state.busy = true; $("search-btn").disabled = true; $("search-btn").textContent = "Searching…";
  const form = new FormData();
  form.append("text", text);
  form.append("k", $("k").value);
  if (ref.file) form.append("image", ref.file, ref.file.name);
  else form.append("name", ref.name);
  try {
    const response = await fetch("/search", { method: "POST", body: form });
    const data = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
    if (!response.ok) { clearResults(); showError(data.detail || `HTTP ${response.status}`); return; }
    showError("");
    state.steps.splice(state.current + 1);     // a new search after going back replaces what followed
    state.steps.push({ ref, text, data });
    state.current = state.steps.length - 1;
    renderResults(data);
    renderSteps();
  } catch (err) {
    clearResults();
    showError(`The server did not answer (${err.message}).`);
  } finally {
    state.busy = false; $("search-btn").disabled = false; $("search-btn").textContent = "Search";
  }
}

// ---- text limit: say so when typing or pasting is cut at it ------------------------------------
function setupTextLimit() {
  const input = $("text");
  let cut = false;
  input.addEventListener("beforeinput", (e) => {
    const max = input.maxLength;
    if (max < 0) return;
    const incoming = e.data ?? (e.dataTransfer ? e.dataTransfer.getData("text/plain") : "");
    if (!incoming) return;
    const selected = (input.selectionEnd ?? 0) - (input.selectionStart ?? 0);
    cut = input.value.length - selected + incoming.length > max;
  });
  input.addEventListener("input", () => {
    if (cut) showNote(`Text cut at ${input.maxLength} characters, the server's limit.`);
    else if (input.value.length < input.maxLength) showNote("");
    cut = false;
  });
}

// ---- gallery, status, drop zone --------------------------------------------------------------
async function loadGallery() {
  try {
    const response = await fetch(`/gallery?offset=${state.galleryOffset}&limit=${PAGE}`);
    const data = await response.json();
    if (!response.ok) { showError(data.detail); return; }
    const grid = $("gallery");
    for (const item of data.items) grid.appendChild(card(item, pickFromGrid));
    state.galleryOffset += data.items.length;
    $("gallery-count").textContent = `(${data.total} images)`;
    $("more").hidden = state.galleryOffset >= data.total;
  } catch (err) {
    showError(`Could not load the gallery (${err.message}).`);
  }
}

async function loadStatus() {
  try {
    const data = await (await fetch("/healthz")).json();
    if (data.limits && data.limits.max_text_chars) {
      state.maxText = data.limits.max_text_chars;
      $("text").maxLength = state.maxText;
    }
    const busy = data.status === "saturated" ? " · busy" : "";
    $("status").textContent = `${data.images} images · ${data.method} · ${data.engine} index${busy}`;
  } catch (err) { /* the page still works without it */ }
}

function setupDropzone() {
  const zone = $("dropzone"), input = $("file");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
  input.addEventListener("change", () => { setReferenceFile(input.files[0]); input.value = ""; });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, (e) => { e.preventDefault(); zone.classList.remove("over"); });
  }
  zone.addEventListener("drop", (e) => setReferenceFile(e.dataTransfer.files[0]));
  $("ref-img").addEventListener("error", refPreviewFailed);
}

setupDropzone();
setupTextLimit();
$("search-form").addEventListener("submit", search);
$("more").addEventListener("click", loadGallery);
$("undo").addEventListener("click", undo);
$("reset").addEventListener("click", reset);
$("viewer-close").addEventListener("click", () => $("viewer").close());
$("viewer").addEventListener("click", (e) => { if (e.target === $("viewer")) $("viewer").close(); });
loadStatus();
loadGallery();
