// The dashboard: four pages drawn from the ledger's JSON (services/ledger/dashboard.py), charts as inline SVG.
// No framework and no build step: the machine it runs on may be offline.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const OUTCOMES = { kept: "kept (new c*)", discarded: "discarded", aborted: "aborted", failed: "crashed / invalid" };

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children.flat(Infinity)) node.append(child instanceof Node ? child : String(child));
  return node;
}

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  if (!response.ok) throw new Error(`${path}: ${response.status} ${await response.text()}`);
  return response.json();
}

const fmt = (value, digits = 4) => (value === null || value === undefined ? "-" : Number(value).toFixed(digits));
const signed = (value) => (value === null || value === undefined ? "-" : (value > 0 ? "+" : "") + Number(value).toFixed(4));

// --- one chart: scatter marks, lines, bands and vertical markers on linear axes ------------------------------

function chart({ title, xLabel, series = [], bands = [], intervals = [], marks = [], rules = [], width = 560, height = 260 }) {
  const pad = { left: 52, right: 12, top: 10, bottom: 34 };
  const xs = [], ys = [];
  for (const s of series) for (const [x, y] of s.points) { xs.push(x); ys.push(y); }
  for (const b of bands) for (const [x, lo, hi] of b.points) { xs.push(x); ys.push(lo, hi); }
  for (const i of intervals) { xs.push(i.x); ys.push(i.low, i.high); }
  for (const m of marks) xs.push(m.x);
  for (const r of rules) ys.push(r.y);
  const svg = el("svg:svg", { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": title });
  if (!xs.length) {
    svg.append(el("svg:text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "tick" }, "no data yet"));
    return el("div", { class: "chart" }, el("h3", {}, title), svg);
  }
  const span = (values) => {
    let lo = Math.min(...values), hi = Math.max(...values);
    if (lo === hi) { lo -= 0.5; hi += 0.5; }
    const margin = (hi - lo) * 0.05;
    return [lo - margin, hi + margin];
  };
  const [x0, x1] = span(xs), [y0, y1] = span(ys);
  const X = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const Y = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  for (const [t, vertical] of [...ticks(x0, x1).map((t) => [t, true]), ...ticks(y0, y1).map((t) => [t, false])]) {
    if (vertical) {
      svg.append(el("svg:line", { x1: X(t), x2: X(t), y1: pad.top, y2: height - pad.bottom, class: "grid" }));
      svg.append(el("svg:text", { x: X(t), y: height - pad.bottom + 14, "text-anchor": "middle", class: "tick" }, label(t)));
    } else {
      svg.append(el("svg:line", { x1: pad.left, x2: width - pad.right, y1: Y(t), y2: Y(t), class: "grid" }));
      svg.append(el("svg:text", { x: pad.left - 6, y: Y(t) + 4, "text-anchor": "end", class: "tick" }, label(t)));
    }
  }
  svg.append(el("svg:text", { x: (width + pad.left) / 2, y: height - 4, "text-anchor": "middle", class: "tick" }, xLabel));
  for (const b of bands) {
    const top = b.points.map(([x, , hi]) => `${X(x)},${Y(hi)}`);
    const bottom = b.points.slice().reverse().map(([x, lo]) => `${X(x)},${Y(lo)}`);
    svg.append(el("svg:polygon", { points: [...top, ...bottom].join(" "), class: b.cls || "band" }));
  }
  for (const r of rules) {
    svg.append(el("svg:line", { x1: pad.left, x2: width - pad.right, y1: Y(r.y), y2: Y(r.y), class: r.cls }));
  }
  for (const i of intervals) {
    svg.append(el("svg:line", { x1: X(i.x), x2: X(i.x), y1: Y(i.low), y2: Y(i.high), class: "interval" }));
  }
  for (const s of series) {
    if (s.kind === "dots") {
      for (const [x, y, href] of s.points) {
        const dot = el("svg:circle", { cx: X(x), cy: Y(y), r: 3.5, class: s.cls }, el("svg:title", {}, s.name));
        svg.append(href ? el("svg:a", { href }, dot) : dot);
      }
    } else {
      const path = s.points.map(([x, y], i) => {
        if (s.kind === "step" && i > 0) return `H${X(x)}V${Y(y)}`;
        return `${i ? "L" : "M"}${X(x)},${Y(y)}`;
      }).join("");
      svg.append(el("svg:path", { d: path, class: s.cls, "data-points": s.points.length }));
    }
  }
  for (const m of marks) {
    svg.append(el("svg:line", { x1: X(m.x), x2: X(m.x), y1: pad.top, y2: height - pad.bottom, class: m.cls },
      el("svg:title", {}, m.title || "")));
  }
  svg.append(el("svg:line", { x1: pad.left, x2: pad.left, y1: pad.top, y2: height - pad.bottom, class: "axis" }));
  svg.append(el("svg:line", { x1: pad.left, x2: width - pad.right, y1: height - pad.bottom, y2: height - pad.bottom, class: "axis" }));
  return el("div", { class: "chart" }, el("h3", {}, title), svg);
}

function ticks(lo, hi, count = 5) {
  const step = 10 ** Math.floor(Math.log10((hi - lo) / count));
  const nice = [1, 2, 5, 10].map((m) => m * step).find((s) => (hi - lo) / s <= count) || step * 10;
  const out = [];
  for (let t = Math.ceil(lo / nice) * nice; t <= hi; t += nice) out.push(Number(t.toPrecision(12)));
  return out;
}

const label = (t) => (Math.abs(t) >= 1000 || (Math.abs(t) < 0.01 && t !== 0) ? t.toExponential(1) : String(t));

function legend(entries) {
  return el("div", { class: "legend" }, entries.map(([cls, text]) => el("span", {}, el("i", { class: cls, style: `background: var(--${cls})` }), text)));
}

function table(header, rows, numeric = []) {
  if (!rows.length) return el("p", { class: "empty" }, "none yet");
  return el("div", { class: "scroll" }, el("table", {},
    el("tr", {}, header.map((h, i) => el("th", { class: numeric.includes(i) ? "num" : null }, h))),
    rows.map((row) => el("tr", {}, row.map((cell, i) => el("td", { class: numeric.includes(i) ? "num" : null }, cell))))));
}

const runLink = (proposalId) => el("a", { href: `/runs/${encodeURIComponent(proposalId)}` }, proposalId.slice(0, 12));

// --- pages ---------------------------------------------------------------------------------------------------

async function overview(main) {
  const data = await api("/api/overview");
  const k = data.kpis;
  const kpis = el("div", { class: "kpis" }, [
    [fmt(k.best), "best val-bpb (c*)"], [fmt(k.baseline), "baseline"], [signed(k.delta), "Δbpb against the baseline"],
    [k.experiments, "experiments"], [k.per_hour === null ? "-" : k.per_hour.toFixed(1), "experiments / hour"],
    [`${k.aborted} of ${k.trained}`, "aborted"], [k.G.toFixed(2), "G (eq. 9)"], [k.running, "running now"],
  ].map(([value, name]) => el("div", {}, el("b", {}, String(value)), el("span", {}, name))));
  const dots = (x) => Object.keys(OUTCOMES).map((outcome) => ({
    kind: "dots", cls: outcome, name: OUTCOMES[outcome],
    points: data.experiments.filter((e) => e.outcome === outcome)
      .map((e) => [e[x], e.val_bpb ?? data.ceiling, `/runs/${encodeURIComponent(e.proposal_id)}`]),
  }));
  const best = (x) => ({ kind: "step", cls: "best", name: "best so far",
    points: data.experiments.filter((e) => e.best !== null).map((e) => [e[x], e.best]) });
  main.replaceChildren(
    kpis,
    el("h2", {}, "Best so far"),
    legend([["kept", OUTCOMES.kept], ["discarded", OUTCOMES.discarded], ["aborted", OUTCOMES.aborted], ["failed", OUTCOMES.failed]]),
    el("div", { class: "charts", id: "progress" },
      chart({ title: "val-bpb by experiment", xLabel: "experiment", series: [...dots("index"), best("index")] }),
      chart({ title: "val-bpb by wall-clock hours", xLabel: "hours", series: [...dots("hours"), best("hours")] })),
    el("h2", {}, "c* and its lineage of kept edits from the baseline"),
    table(["kept", "proposal", "kind", "rationale", "val-bpb", "Δbpb"],
      data.lineage.map((c) => [c.finished_at.slice(5, 16).replace("T", " "), runLink(c.proposal_id), c.kind, c.rationale, fmt(c.val_bpb), signed(c.delta)]), [4, 5]),
    el("h2", {}, "Latest experiments"),
    table(["#", "proposal", "status", "val-bpb", "policy", "rationale"],
      data.experiments.slice(-25).reverse().map((e) => [e.index, runLink(e.proposal_id),
        el("span", { class: `status-${e.outcome === "kept" ? "kept" : e.status}` }, e.outcome === "kept" ? "kept" : e.status),
        fmt(e.val_bpb), `${e.policy} ${e.policy_version}`, e.rationale]), [0, 3]),
  );
}

function liveCard(run) {
  const series = [{ kind: "line", cls: "curve", name: "train loss", points: run.points }];
  const bands = run.forecasts.length ? [{ points: run.forecasts.map((f) => [f.used, f.low, f.high]) }] : [];
  const abort = run.abort;
  const atAbort = abort && abort.forecast !== null ? [{ used: abort.used, mean: abort.forecast, low: abort.forecast_low, high: abort.forecast_high }] : [];
  const forecastDots = { kind: "dots", cls: "forecast", name: "forecast final val-bpb",
                         points: [...run.forecasts, ...atAbort].map((f) => [f.used, f.mean]) };
  const intervals = atAbort.map((f) => ({ x: f.used, low: f.low, high: f.high }));
  const rules = run.threshold === null ? [] : [{ y: run.threshold, cls: "threshold" }];
  const marks = abort ? [{ x: abort.used, cls: "abort-mark", title: abort.commentary }] : [];
  const last = run.forecasts.at(-1);
  return el("div", { class: "card", "data-run": run.run_id },
    el("b", {}, runLink(run.proposal_id), ` ${run.run_id.split("-").at(-1) !== "1" ? "(delivery " + run.run_id.split("-").at(-1) + ")" : ""}`),
    el("p", {}, run.rationale || ""),
    chart({ title: `${run.status}: step ${run.step}, ${(100 * run.used).toFixed(0)}% of budget`, xLabel: "budget used",
            series: [...series, forecastDots], bands, intervals, marks, rules, height: 220 }),
    el("p", {}, run.abort ? `aborted: ${run.abort.commentary}`
      : last ? `forecast ${fmt(last.mean)} [${fmt(last.low)}, ${fmt(last.high)}] (90%); ${last.verdict}` : run.note));
}

function live(main) {
  const cards = el("div", { class: "cards", id: "live-runs" });
  const note = el("p", { class: "empty" }, "connecting…");
  main.replaceChildren(el("h2", {}, "Runs in flight"), note, cards,
    el("p", {}, "Loss curves against the fraction of the budget used; blue dots and band: the evaluator's forecast of the final val-bpb and its 90% interval at each look (for an aborted run, the one it aborted on); dashed: the threshold τ; red: where the evaluator aborted. A run stays here a minute after it ends."));
  const source = new EventSource("/api/live/stream");
  source.onmessage = (message) => {
    const runs = JSON.parse(message.data).runs;
    note.textContent = runs.length ? "" : "no run in flight";
    cards.replaceChildren(...runs.map(liveCard));
  };
  source.onerror = () => { note.textContent = "reconnecting…"; };
}

function sideBySide(rows) {
  const grid = el("div", { class: "diff" });
  for (const row of rows) {
    grid.append(el("div", { class: row.left === null ? "gap" : row.kind === "equal" ? null : "del" }, row.left ?? ""));
    grid.append(el("div", { class: row.right === null ? "gap" : row.kind === "equal" ? null : "add" }, row.right ?? ""));
  }
  return grid;
}

async function runPage(main) {
  const id = decodeURIComponent(location.pathname.split("/").pop());
  const run = await api(`/api/runs/${encodeURIComponent(id)}`);
  const e = run.experiment;
  const facts = [
    ["status", e.status + (e.keep ? ` (${e.keep})` : "")], ["val-bpb", fmt(e.val_bpb)], ["c* then", fmt(e.bpb_star)],
    ["policy", `${e.policy} ${e.policy_version}`], ["purpose", e.purpose], ["kind", run.kind], ["rationale", e.rationale || "-"],
    ["run", `${e.run_id ?? "-"} on ${e.executor_id ?? "-"}`], ["training", `${fmt(e.training_s, 1)} s, ${e.steps ?? 0} steps`],
    ["proposed", e.proposed_at], ["finished", e.finished_at ?? "not yet"],
  ];
  const abort = run.abort;
  main.replaceChildren(
    el("h2", {}, `Experiment ${e.proposal_id}`),
    el("dl", {}, facts.map(([name, value]) => [el("dt", {}, name), el("dd", {}, String(value))])),
    el("h2", {}, "Progress"),
    chart({ title: "train loss", xLabel: "budget used", series: [{ kind: "line", cls: "curve", name: "train loss", points: run.points }],
            marks: abort ? [{ x: abort.used, cls: "abort-mark", title: abort.commentary }] : [] }),
    el("h2", {}, "The evaluator"),
    el("p", {}, abort ? `Aborted at ${fmt(abort.at_train_s, 1)} s of training: ${abort.commentary}` : e.status === "aborted" ? e.error : "Not aborted."),
    el("h2", {}, "Reward"),
    run.reward ? table(["term", "value"], Object.entries(run.reward).map(([term, value]) => [term, fmt(value)]), [1])
      : el("p", { class: "empty" }, run.no_reward),
    el("h2", {}, "The edit, side by side (parent | this code)"),
    run.diff.length ? sideBySide(run.diff) : el("p", { class: "empty" }, "no change: a repeat of its parent"),
    ...(e.error_tail ? [el("h2", {}, "Error"), el("pre", {}, `${e.error}\n\n${e.error_tail}`)] : []),
    el("h2", {}, "train.py"),
    el("pre", { id: "code" }, run.code ?? "(not in the ledger)"),
  );
}

async function policy(main) {
  const data = await api("/api/policy");
  const stats = ["mean_reward", "entropy", "approx_kl", "clip_fraction", "value_loss"];
  const kinds = [...new Set(data.kinds.flatMap((b) => Object.keys(b.counts)))].sort();
  main.replaceChildren(
    el("h2", {}, "PPO statistics per policy.updated"),
    data.updates.length ? el("div", { class: "charts", id: "ppo" }, stats.map((stat) => chart({
      title: stat.replace("_", " "), xLabel: "update", height: 200,
      series: [{ kind: "line", cls: "curve", name: stat, points: data.updates.map((u) => [u.update_index, u[stat]]) },
               { kind: "dots", cls: "forecast", name: stat, points: data.updates.map((u) => [u.update_index, u[stat]]) }],
    }))) : el("p", { class: "empty" }, "No policy.updated yet: the learner publishes one per PPO batch of language-model proposals."),
    el("h2", {}, `Edits proposed, by kind, per ${data.bucket} experiments`),
    table(["experiments", ...kinds], data.kinds.map((b) => [b.label, ...kinds.map((kind) => String(b.counts[kind] ?? 0))]),
      kinds.map((_, i) => i + 1)),
    el("h2", {}, "Updates"),
    table(["update", "version", "at", ...stats], data.updates.map((u) => [u.update_index, u.policy_version, u.ts.slice(0, 19), ...stats.map((s) => fmt(u[s]))]),
      [0, 3, 4, 5, 6, 7]),
  );
}

const PAGES = { overview, live, run: runPage, policy };

async function start() {
  const main = document.querySelector("main");
  const page = document.body.dataset.page;
  for (const link of document.querySelectorAll("header a")) {
    if (link.dataset.page === page) link.classList.add("here");
  }
  try {
    await PAGES[page](main);
    if (page === "overview") setInterval(() => overview(main).catch(() => {}), 15000);
  } catch (error) {
    main.replaceChildren(el("p", { class: "empty" }, `Could not load this page: ${error.message}`));
  }
}

start();
