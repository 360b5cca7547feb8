// The search page: send a query (an uploaded image or a database item) to /api/search and show its
// Hamming ball. Plain JavaScript, no build step, nothing fetched from outside this server.
"use strict";

const $ = (id) => document.getElementById(id);
let current = null;        // the query on show: {file} or {item}, searched again when the radius changes
let latest = 0;            // number of the latest search: an older answer arriving late is dropped

// fetch, and the JSON answer; an Error whose message says in words what went wrong otherwise.
async function api(path, options) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (error) {
    throw new Error(`the server did not answer (${error.message}); is serve.py still running?`);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    throw new Error(`the server answered ${response.status} ${response.statusText} without JSON`);
  }
  if (!response.ok) {
    throw new Error(body && body.error ? body.error : `the server answered ${response.status}`);
  }
  return body;
}

function showError(message) {
  $("error").textContent = message ? `Error: ${message}` : "";
  $("error").hidden = !message;
}

async function loadStats() {
  try {
    const stats = await api("/api/stats");
    const labels = stats.labels === null ? "no labels" : `${stats.labels} labels`;
    $("stats").textContent = `${stats.items.toLocaleString()} items, ${stats.bits}-bit codes, ` +
      `${stats.distinct_codes.toLocaleString()} distinct codes, ${labels}; snapshot ${stats.snapshot}` +
      (stats.index_file ? `; index ${stats.index_file}` : "");
  } catch (error) {
    $("stats").textContent = "";
    showError(error.message);
  }
}

async function search(query) {
  current = query;
  const number = ++latest;
  const params = new URLSearchParams({radius: $("radius").value, topk: $("topk").value});
  const options = {method: "POST"};
  if (query.file) {
    options.body = new FormData();
    options.body.append("image", query.file, query.file.name || "upload");
  } else {
    params.set("item", query.item);
  }
  $("status").textContent = "Searching…";
  try {
    const answer = await api(`/api/search?${params}`, options);
    if (number !== latest) return;
    showError("");
    showAnswer(query, answer);
  } catch (error) {
    if (number !== latest) return;
    $("status").textContent = "";
    showError(error.message);
  }
}

function itemImage(index) {
  return `/api/items/${index}/image`;
}

function showAnswer(query, answer) {
  const image = $("query-image");
  if (image.dataset.objectUrl) URL.revokeObjectURL(image.dataset.objectUrl);
  image.dataset.objectUrl = query.file ? URL.createObjectURL(query.file) : "";
  image.src = query.file ? image.dataset.objectUrl : itemImage(query.item);
  $("query-name").textContent = query.file ? `uploaded: ${answer.query}` : `database item ${query.item}: ${answer.query}`;
  $("query-bits").textContent = answer.code.length;
  $("query-code").textContent = answer.code.match(/.{1,8}/g).join(" ");
  $("summary").textContent = summary(answer);
  $("timings").textContent = `encoding ${answer.timings_ms.encode.toFixed(1)} ms, lookup ${answer.timings_ms.lookup.toFixed(1)} ms`;
  $("query").hidden = false;
  $("status").textContent = "";
  const grid = $("results");
  grid.replaceChildren(...answer.results.map(resultCard));
  clearNotes();
  if (answer.ball_size === 0) {
    const note = document.createElement("p");
    note.className = "empty";
    note.textContent = answer.fallback
      ? `The ball of radius ${answer.radius} is empty: these are the ${answer.results.length} nearest codes, by Hamming distance then score.`
      : `The ball of radius ${answer.radius} is empty. Try a larger radius.`;
    grid.before(note);
  }
}

function summary(answer) {
  if (answer.ball_size === 0) return `ball of radius ${answer.radius}: empty`;
  return `ball of radius ${answer.radius}: ${answer.ball_size.toLocaleString()} items; ` +
    `the first ${answer.results.length} by score`;
}

function resultCard(result) {
  const card = document.createElement("figure");
  card.className = "result" + ("relevant" in result ? (result.relevant ? " relevant" : " irrelevant") : "");
  card.dataset.index = result.index;
  const button = document.createElement("button");
  button.type = "button";
  button.title = `search with item ${result.index}${result.path ? ": " + result.path : ""}`;
  if (result.path) {
    const image = document.createElement("img");
    image.src = itemImage(result.index);
    image.alt = `item ${result.index}`;
    image.loading = "lazy";
    button.append(image);
  } else {
    const label = document.createElement("span");
    label.className = "unnamed";
    label.textContent = `#${result.index}`;
    button.append(label);
  }
  button.addEventListener("click", () => search({item: result.index}));
  const caption = document.createElement("figcaption");
  const relevance = "relevant" in result ? (result.relevant ? ", relevant" : ", not relevant") : "";
  caption.textContent = `#${result.rank} · d ${result.distance} · ${result.score.toFixed(2)}${relevance}`;
  card.append(button, caption);
  return card;
}

function clearNotes() {
  document.querySelectorAll(".empty").forEach((note) => note.remove());
}

function searchFile(file) {
  if (file) search({file});
}

function setUp() {
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    searchFile(event.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter") $("file").click(); });
  $("file").addEventListener("change", (event) => { searchFile(event.target.files[0]); event.target.value = ""; });
  $("random").addEventListener("click", async () => {
    try {
      search({item: (await api("/api/items/random")).index});
    } catch (error) {
      showError(error.message);
    }
  });
  for (const id of ["radius", "topk"]) {
    $(id).addEventListener("change", () => { if (current) search(current); });
  }
  loadStats();
}

document.addEventListener("DOMContentLoaded", setUp);
