// The experiments page: GET /feedback drawn as a table; no framework, no build step.
"use strict";

const RANKS = 10;

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function row(t) {
  const tr = document.createElement("tr");
  tr.dataset.arm = t.arm ?? "";
  const ctr = t.ctr === null ? "—"
    : `${t.ctr.toFixed(4)} [${t.ctr_95[0].toFixed(4)}, ${t.ctr_95[1].toFixed(4)}]`;
  const ranks = [];
  for (let r = 1; r <= RANKS; r++) ranks.push(t.clicks_by_rank[String(r)] ?? 0);
  tr.append(
    cell(t.model_version),
    cell(t.arm ?? "none"),
    cell(t.impressions.toLocaleString("en"), "impressions"),
    cell(t.clicks.toLocaleString("en"), "clicks"),
    cell(ctr, "ctr"),
    cell(ranks.join(" "), "ranks"),
  );
  return tr;
}

async function refresh() {
  const status = document.getElementById("status");
  try {
    const response = await fetch("/feedback", withKey());
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(`${body.detail ?? response.status}${response.status === 401 ? ": enter an API key above" : ""}`);
    }
    const totals = await response.json();
    document.querySelector("#totals tbody").replaceChildren(...totals.map(row));
    status.textContent = totals.length ? "" : "no feedback yet";
  } catch (err) {
    status.textContent = String(err.message ?? err);
  } finally {
    document.body.dataset.busy = "false";
  }
}

onKeyForm(refresh);

refresh();
setInterval(refresh, 5000);
