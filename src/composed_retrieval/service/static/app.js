// Composed image search page: no framework, no build step, talks to the JSON API of `cir serve`.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, name: null, galleryOffset: 0, busy: false };
const PAGE = 40;

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function setReferenceFile(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) { showError(`${file.name} is not an image`); return; }
  state.file = file; state.name = null;
  const img = $("ref-img");
  img.src = URL.createObjectURL(file);
  img.hidden = false; $("drop-hint").hidden = true;
  $("ref-label").textContent = `Uploaded: ${file.name}`;
  $("ref-label").dataset.name = "";
  showError("");
}

function setReferenceName(name, thumbnailUrl) {
  state.name = name; state.file = null;
  const img = $("ref-img");
  img.src = thumbnailUrl;
  img.hidden = false; $("drop-hint").hidden = true;
  $("ref-label").textContent = `Gallery: ${name}`;
  $("ref-label").dataset.name = name;
  showError("");
  const text = $("text");
  text.focus(); text.select();
}

function card(item, onClick, extra) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "card";
  button.dataset.name = item.name;
  button.title = `${item.name} — use as reference`;
  const img = document.createElement("img");
  img.src = item.thumbnail_url; img.alt = item.name; img.loading = "lazy";
  button.appendChild(img);
  if (extra) button.appendChild(extra);
  const caption = document.createElement("span");
  caption.className = "name"; caption.textContent = item.name;
  button.appendChild(caption);
  button.addEventListener("click", () => onClick(item));
  return button;
}

function pickFromGrid(item) {
  setReferenceName(item.name, item.thumbnail_url);
  window.scrollTo({ top: 0, behavior: "smooth" });
}

function renderResults(data) {
  const grid = $("results");
  grid.replaceChildren();
  for (const hit of data.results) {
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.innerHTML = `<b>#${hit.rank}</b><span class="score">${hit.score.toFixed(3)}</span>`;
    grid.appendChild(card(hit, pickFromGrid, meta));
  }
  $("results-title").textContent = `Results for “${data.text}”`;
  $("results-section").hidden = false;
  if (!data.results.length) grid.textContent = "No results.";
}

function addHistory(label, text) {
  const li = document.createElement("li");
  li.textContent = `${label} → “${text}”`;
  $("history").appendChild(li);
  $("history-title").hidden = false;
}

async function search(event) {
  if (event) event.preventDefault();
  const text = $("text").value.trim();
  if (!state.file && !state.name) { showError("Choose a reference image first."); return; }
  if (!text) { showError("Describe what should change."); $("text").focus(); return; }
  if (state.busy) return;
  state.busy = true; $("search-btn").disabled = true; $("search-btn").textContent = "Searching…";
  const form = new FormData();
  form.append("text", text);
  form.append("k", $("k").value);
  if (state.file) form.append("image", state.file, state.file.name);
  else form.append("name", state.name);
  try {
    const response = await fetch("/search", { method: "POST", body: form });
    const data = await response.json().catch(() => ({ detail: `HTTP ${response.status}` }));
    if (!response.ok) { showError(data.detail || `HTTP ${response.status}`); return; }
    showError("");
    renderResults(data);
    addHistory(state.name || (state.file && state.file.name) || "reference", text);
  } catch (err) {
    showError(`The server did not answer (${err.message}).`);
  } finally {
    state.busy = false; $("search-btn").disabled = false; $("search-btn").textContent = "Search";
  }
}

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
    $("status").textContent = `${data.images} images · ${data.method} · ${data.engine} index`;
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
}

setupDropzone();
$("search-form").addEventListener("submit", search);
$("more").addEventListener("click", loadGallery);
loadStatus();
loadGallery();
