// The page: drop, choose or paste a photo; POST /api/search; draw the query and its grid.
"use strict";

const $ = (id) => document.getElementById(id);
let queryUrl = null;

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = !text;
}

async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new Error("the server cannot be reached; is siamese-serve running?");
  }
  let body = null;
  try { body = await response.json(); } catch (error) { body = null; }
  if (!response.ok) {
    throw new Error((body && body.detail) || `the server answered ${response.status}`);
  }
  return body;
}

async function loadInfo() {
  try {
    const info = await api("/api/info");
    $("about").textContent = `${info.gallery_size} photos in ${info.classes.length} classes · ` +
      `${info.backbone} (${info.embedding_dim}-d, ${info.engine} ${info.precision}) · ` +
      `${info.index_kind} index`;
    const select = $("label");
    for (const name of info.classes) {
      const option = document.createElement("option");
      option.value = option.textContent = name;
      select.appendChild(option);
    }
  } catch (error) {
    $("about").textContent = "";
    showMessage(error.message);
  }
}

function setQuery(src, caption) {
  if (queryUrl) URL.revokeObjectURL(queryUrl);
  queryUrl = src.startsWith("blob:") ? src : null;
  $("query-image").src = src;
  $("query-caption").textContent = caption;
}

function drawHits(result) {
  const grid = $("grid");
  grid.replaceChildren();
  for (const hit of result.hits) {
    const item = document.createElement("li");
    item.className = hit.copy ? "hit copy" : "hit";
    const img = document.createElement("img");
    img.src = hit.image_url;
    img.alt = `${hit.label_name} (${hit.id})`;
    img.loading = "lazy";
    const meta = document.createElement("div");
    meta.className = "meta";
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `#${hit.rank} · ${hit.score.toFixed(3)}`;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = hit.label_name;
    const more = document.createElement("button");
    more.className = "button more";
    more.type = "button";
    more.textContent = "More like this";
    more.addEventListener("click", () => similar(hit));
    meta.append(score);
    if (hit.copy) {
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = `copy · ${hit.copy_score.toFixed(3)}`;
      badge.title = `a copy of the query: ${result.copy_rule}`;
      meta.append(badge);
    }
    meta.append(label, more);
    item.append(img, meta);
    grid.appendChild(item);
  }
  const label = result.label ? ` of class ${result.label}` : "";
  const copies = result.hits.filter((hit) => hit.copy).length;
  const found = copies ? ` · ${copies} ${copies === 1 ? "copy" : "copies"} of the query first` : "";
  $("summary").textContent =
    `Top ${result.hits.length}${label}${found} · ${result.took_ms.toFixed(0)} ms`;
  $("results").hidden = false;
}

function options() {
  const params = new URLSearchParams({ top: $("top").value });
  if ($("label").value) params.set("label", $("label").value);
  return params;
}

async function run(task) {
  showMessage("");
  document.body.classList.add("busy");
  try {
    drawHits(await task());
  } catch (error) {
    showMessage(`Refused: ${error.message}`);
  } finally {
    document.body.classList.remove("busy");
  }
}

function searchFile(file) {
  if (!file) return;
  const form = new FormData();
  form.append("image", file, file.name || "pasted-image");
  for (const [key, value] of options()) form.append(key, value);
  run(async () => {
    const result = await api("/api/search", { method: "POST", body: form });
    const size = result.query ? `${result.query.width}×${result.query.height} px` : "";
    setQuery(URL.createObjectURL(file), `Your photo: ${file.name || "pasted"} · ${size}`);
    return result;
  });
}

function similar(hit) {
  run(async () => {
    const result = await api(`/api/similar/${encodeURIComponent(hit.id)}?${options()}`);
    setQuery(hit.image_url, `Gallery photo ${hit.id} (${hit.label_name})`);
    window.scrollTo({ top: 0, behavior: "smooth" });
    return result;
  });
}

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => {
    searchFile(event.target.files[0]);
    event.target.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    searchFile(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = [...event.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) searchFile(item.getAsFile());
  });
  loadInfo();
}

document.addEventListener("DOMContentLoaded", setUp);
