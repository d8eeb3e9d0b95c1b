// featstore serve: the item grid's filters and the neighbour panels (vanilla JS).
"use strict";
const main = document.querySelector("main");
const key = main.dataset.key;

function esc(text) {
  const d = document.createElement("div");
  d.textContent = String(text);
  return d.innerHTML;
}

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin" });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function fill(select, values) {
  for (const v of [...new Set(values)].sort()) {
    const o = document.createElement("option");
    o.value = o.textContent = String(v);
    select.appendChild(o);
  }
}

async function browser() {
  const grid = document.getElementById("grid");
  const { items } = await getJSON(`/api/sets/${key}/items`);
  const f = { split: "f-split", label: "f-label", predicted: "f-pred" };
  fill(document.getElementById(f.split), items.map((i) => i.split));
  fill(document.getElementById(f.label), items.filter((i) => i.label !== null).map((i) => i.label));
  fill(document.getElementById(f.predicted),
       items.filter((i) => i.predicted !== null).map((i) => i.predicted));
  const limit = 300;
  function draw() {
    const want = Object.fromEntries(
      Object.entries(f).map(([k, id]) => [k, document.getElementById(id).value]));
    const shown = items.filter((i) => Object.entries(want).every(
      ([k, v]) => v === "" || String(i[k]) === v));
    document.getElementById("count").textContent =
      `${shown.length} items` + (shown.length > limit ? ` (first ${limit} shown)` : "");
    grid.innerHTML = shown.slice(0, limit).map((i) =>
      `<a class="item" data-item="${i.item}" href="/set/${key}/item/${i.item}">` +
      `<img loading="lazy" src="/img/${key}/${i.item}/tile.png" ` +
      `onerror="this.classList.add('broken');this.alt='unreadable'" alt="">` +
      `<br>${esc(i.sample)} ${esc(i.split)} label ${esc(i.label)}` +
      (i.predicted === null ? "" : ` pred ${esc(i.predicted)}`) + `</a>`).join("");
  }
  for (const id of Object.values(f)) document.getElementById(id).addEventListener("change", draw);
  draw();
}

async function neighbours(side, setKey, item) {
  const list = side.querySelector("ol");
  side.dataset.set = setKey || "";
  if (!setKey) { list.innerHTML = ""; return; }
  try {
    const r = await getJSON(`/api/sets/${setKey}/neighbours/${item}?k=8`);
    list.innerHTML = r.neighbours.map((n) =>
      `<li class="neighbour" data-item="${n.item}" data-label="${esc(n.label)}">` +
      `<img src="/img/${setKey}/${n.item}/tile.png" alt=""> ` +
      `<a href="/set/${setKey}/item/${n.item}">${esc(n.sample)}</a> label ${esc(n.label)}` +
      ` cos ${n.similarity.toFixed(3)}</li>`).join("");
  } catch (e) {
    list.innerHTML = `<li class="error">${esc(e.message)}</li>`;
  }
  side.dataset.loaded = "1";
}

function item() {
  const at = main.dataset.item;
  neighbours(document.getElementById("side-a"), key, at);
  const b = document.getElementById("side-b");
  const pick = document.getElementById("partner");
  if (main.dataset.partner) pick.value = main.dataset.partner;
  neighbours(b, pick.value, at);
  pick.addEventListener("change", () => neighbours(b, pick.value, at));
}

if (main.dataset.view === "browser") browser();
if (main.dataset.view === "item") item();
