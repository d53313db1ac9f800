// The explanation page: reads the JSON API and draws it; no framework, no build step.
"use strict";

const RECOMMENDATIONS = 10;
const STRONGEST = 0.75; // opacity of an image's strongest region: the image stays visible
const userId = decodeURIComponent(location.pathname.split("/").pop());
const itemInfo = new Map(); // item id -> Promise of {item_id, title, image_url}
// The item explained: the one in the URL, else the current top recommendation.
let explained = Number(new URLSearchParams(location.search).get("item_id")) || null;
// Filters in the page's URL (?genres=Comedy&year_min=1990&attribute=colour:red, as GET
// /recommend takes them) go with every /recommend the page makes, so the page shows a
// filtered list.
const FILTERS = [
  "genres",
  "exclude_genres",
  "year_min",
  "year_max",
  "attribute",
  "exclude_attribute",
  "exclude_items",
  "diversity",
];
const filters = new URLSearchParams(
  [...new URLSearchParams(location.search)].filter(([name]) => FILTERS.includes(name)),
);
let latest = 0; // only the newest refresh draws, when several overlap

const $ = (id) => document.getElementById(id);
const api = (path) => `${path}/${encodeURIComponent(userId)}`;

async function getJSON(url, options) {
  const response = await fetch(url, withKey(options));
  if (response.status === 401) throw new Error(`${await reason(response)}: enter an API key above`);
  if (!response.ok) throw new Error(await reason(response));
  return response.json();
}

// An <img> cannot send a header: with a key, the image is fetched and shown from a blob.
function image(url, alt) {
  const img = el("img", { alt });
  img.dataset.src = url;
  if (!hasKey()) {
    img.src = url;
    return img;
  }
  fetch(url, withKey())
    .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(`${url}: ${r.status}`))))
    .then((blob) => { img.src = URL.createObjectURL(blob); })
    .catch(() => { img.src = url; });
  return img;
}

// FastAPI's errors are {"detail": "..."}; anything else is shown as it came.
async function reason(response) {
  const text = await response.text();
  try {
    const detail = JSON.parse(text).detail;
    if (typeof detail === "string") return detail;
  } catch {} // not JSON
  return `${response.url}: ${response.status} ${text}`;
}

function info(itemId) {
  if (!itemInfo.has(itemId)) {
    const fallback = { item_id: itemId, title: "", image_url: null, added: false };
    itemInfo.set(itemId, getJSON(`/items/${itemId}`).catch(() => fallback));
  }
  return itemInfo.get(itemId);
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

// Cells of the 7x7 component attention, row by row; opacity grows with weight / largest weight.
function heatmap(components) {
  const weights = components.flat();
  const top = Math.max(...weights) || 1;
  const cells = weights.map((w) =>
    el("div", { className: "cell", title: w.toFixed(3), style: `opacity: ${(STRONGEST * w) / top}` }),
  );
  return el("div", { className: "heatmap" }, ...cells);
}

const label = (item) => `${item.title || "item"} (#${item.item_id})`;

// An item's image (or its id, without a catalogue), an optional overlay, its title, then `below`.
function card(item, className, overlay = null, below = []) {
  const picture = item.image_url
    ? image(item.image_url, item.title)
    : el("div", { className: "placeholder" }, `#${item.item_id}`);
  const frame = el("div", { className: "frame" }, picture, ...(overlay ? [overlay] : []));
  const figure = el("figure", { className: `card ${className}` }, frame);
  // An item added while serving (POST /items) has no history behind its score: say so.
  const badge = () => el("span", { className: "badge", title: "added while serving" }, "new");
  const mark = item.added ? [badge()] : [];
  figure.append(el("figcaption", {}, ...mark, label(item)), ...below);
  figure.dataset.itemId = item.item_id;
  return figure;
}

function drawProfile(why, items) {
  const cards = why.profile.map((p) => {
    const fill = el("span", { style: `width: ${100 * p.attention}%` });
    const bar = el("div", { className: "bar" }, fill);
    const value = el("span", { className: "attention" }, `attention ${p.attention.toFixed(3)}`);
    const overlay = p.components ? heatmap(p.components) : null; // null: a model without images
    return card(items.get(p.item_id), "profile-item", overlay, [bar, value]);
  });
  $("profile").replaceChildren(...(cards.length ? cards : ["No history yet: add an item."]));
  // A model with metadata: the explained item's tags, with the attention on profile items
  // that share each one
  const shared = why.tags.map((t) => `${t.tag} ${t.attention.toFixed(2)}`).join(", ");
  const intro = "Its tags, and the attention on profile items that share each:";
  $("tags").textContent = shared ? `${intro} ${shared}` : "";
}

function drawRecommendations(recs, items, target) {
  const cards = recs.items.map((r) => {
    // A popular item (fallback) has no model score: it is ranked by how many users chose it.
    const value = r.score === null
      ? el("span", { className: "popularity" }, `popular, chosen by ${r.popularity}`)
      : el("span", { className: "score" }, `score ${r.score.toFixed(3)}`);
    const c = card(items.get(r.item_id), "rec", null, [value]);
    c.classList.toggle("selected", r.item_id === target);
    c.addEventListener("click", () => explain(r.item_id));
    return c;
  });
  const note = recs.fallback ? ["(popular items: nothing is known about this user)"] : [];
  if (recs.passing !== null) note.push(`(filtered: ${recs.passing} items pass ${filters})`);
  if (recs.reason) note.push(`(${recs.reason})`);
  $("recommendations").replaceChildren(...cards, ...note);
}

function drawTarget(why, items) {
  const item = items.get(why.item_id);
  const thumb = item.image_url ? [image(item.image_url, item.title)] : [];
  $("target").dataset.itemId = why.item_id;
  $("target").replaceChildren(...thumb, ` ${label(item)}, score ${why.score.toFixed(3)}`);
}

async function refresh() {
  const mine = ++latest;
  document.body.dataset.busy = "true";
  try {
    const query = new URLSearchParams([["k", RECOMMENDATIONS], ...filters]);
    const recs = await getJSON(`${api("/recommend")}?${query}`);
    const target = explained ?? recs.items[0]?.item_id;
    const why = await getJSON(`${api("/explain")}?item_id=${target}`);
    const shown = [why.item_id, ...[...why.profile, ...recs.items].map((x) => x.item_id)];
    const items = new Map(); // item id -> {item_id, title, image_url}
    await Promise.all(shown.map(async (id) => items.set(id, await info(id))));
    if (mine !== latest) return; // a newer refresh draws instead
    drawTarget(why, items);
    drawProfile(why, items);
    drawRecommendations(recs, items, target);
    $("status").textContent = "";
  } catch (error) {
    if (mine === latest) $("status").textContent = String(error.message ?? error);
  } finally {
    if (mine === latest) document.body.dataset.busy = "false";
  }
}

function explain(itemId) {
  explained = itemId;
  history.replaceState(null, "", `?${new URLSearchParams([["item_id", itemId], ...filters])}`);
  return refresh();
}

async function addInteraction(event) {
  event.preventDefault();
  const itemId = Number(event.target.elements.item_id.value);
  const body = JSON.stringify({ events: [{ user_id: userId, item_id: itemId }] });
  const options = { method: "POST", headers: { "content-type": "application/json" }, body };
  try {
    await getJSON("/interactions", options);
    event.target.reset();
    await refresh();
  } catch (error) {
    $("status").textContent = `could not add item ${itemId}: ${error.message}`;
  }
}


$("user").textContent = userId;
onKeyForm(() => {
  itemInfo.clear(); // titles fetched without the key may have failed
  refresh();
});
$("add-interaction").addEventListener("submit", addInteraction);
$("show-heatmaps").addEventListener("change", (e) =>
  document.body.classList.toggle("no-heatmaps", !e.target.checked),
);
refresh();
