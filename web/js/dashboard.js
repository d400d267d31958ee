// The operations dashboard. The server pushes its whole state every few seconds on
// /dashboard/events (src/server/dashboard.py); each push redraws the page, so a missed one
// costs nothing, and the workers are redrawn every half second in between, aged by the
// page's clock with the musician's page's own rule (js/liveness.js): online, stale past one
// heart-beat interval, offline past two. Sparklines are inline SVG built with the DOM (the
// CSP forbids inline styles). Reset is here, not on the musician's page, behind a typed
// confirmation that names what it deletes (and the operator token when the server has one).
import { $, el, svgEl } from "./dom.js";
import { api } from "./api.js";
import { connect } from "./connection.js";
import { ageOf, liveness } from "./liveness.js";


// A line (or bars) of `values` in a 100 x 28 box, scaled to `max`; `label` says it in words.
function sparkline(values, max, label, bars = false) {
  const chart = svgEl("svg", { class: "spark", viewBox: "0 0 100 28", preserveAspectRatio: "none", role: "img",
                             "aria-label": label });
  chart.append(svgEl("line", { class: "base", x1: 0, y1: 27.5, x2: 100, y2: 27.5 }));
  const top = Math.max(max, ...values, 1e-9);
  const y = (v) => (27 - (26 * v) / top).toFixed(2);
  if (bars) {
    const width = 100 / Math.max(values.length, 1);
    values.forEach((v, i) => {
      if (v > 0) chart.append(svgEl("rect", { x: (i * width + 0.5).toFixed(2), y: y(v), width: Math.max(width - 1, 0.5),
                                            height: (27 - y(v)).toFixed(2) }));
    });
  } else if (values.length) {
    const step = values.length > 1 ? 100 / (values.length - 1) : 0;
    const points = values.map((v, i) => `${(i * step).toFixed(2)},${y(v)}`);
    if (values.length === 1) points.push(`100,${y(values[0])}`);
    chart.append(svgEl("polyline", { points: points.join(" ") }));
  }
  return chart;
}

const megabytes = (bytes) => `${(bytes / 1048576).toFixed(0)} MB`;
const rate = (value) => (value >= 10 ? value.toFixed(0) : value.toFixed(2));
const seconds = (value) => (value === null ? "–" : value >= 100 ? `${value.toFixed(0)} s` : `${value.toFixed(1)} s`);
const time = (epoch) => new Date(epoch * 1000).toLocaleTimeString();

// `depths`: [time, jobs waiting] of the kind's queues (all its routes together), from the server's polls
function kindCard(name, k, depths) {
  const stats = el("dl", { class: "stats" },
    el("div", {}, el("dt", {}, "jobs /s"), el("dd", {}, rate(k.jobs_per_second))),
    el("div", {}, el("dt", {}, "media s /s"), el("dd", {}, rate(k.media_seconds_per_second))),
    el("div", {}, el("dt", {}, "latency p50"), el("dd", {}, seconds(k.latency_p50))),
    el("div", {}, el("dt", {}, "latency p95"), el("dd", {}, seconds(k.latency_p95))),
  );
  const jobs = k.jobs_per_bucket, waiting = depths.map((p) => p[1]);
  return el("div", { class: "card", "data-kind": name },
    el("h3", {}, name),
    stats,
    el("p", { class: "small muted" }, `${k.tasks_done} done, ${k.tasks_failed} failed; jobs per ${k.bucket_seconds} s:`),
    sparkline(jobs, 1, `${name}: jobs done per ${k.bucket_seconds} seconds, oldest first: ${jobs.join(", ")}`, true),
    el("div", { class: "depth" }, `waiting: ${waiting.length ? waiting[waiting.length - 1] : "?"}`,
      sparkline(waiting, 1, `${name}: jobs waiting in the broker, oldest first: ${waiting.join(", ") || "no samples"}`)),
  );
}

// A stale or offline worker's job is not shown as its own: it is being (or will be) redone
// by another, which shows it; the stale card says it will be.
function workerCard(w) {
  const cpu = w.history.map((p) => p[1]), memory = w.history.map((p) => p[2]);
  const jobs = Object.entries(w.jobs_by_kind).map(([kind, n]) => `${kind} ${n}`).join(", ") || "none yet";
  const live = liveness(w, receivedAt), age = ageOf(w, receivedAt);
  const status = live === "online"
    ? el("span", { class: `state ${w.state}` }, w.state === "busy" ? `busy: job ${w.job_id}` : w.state)
    : live === "stale"
      ? el("span", { class: "state stale" }, `not answering for ${Math.round(age)} s` +
           (w.job_id != null ? `; job ${w.job_id} goes to another worker` : ""))
      : el("span", { class: "state failed" }, `offline since ${time(w.offline_since ?? Date.now() / 1000 - age)}`);
  return el("li", { class: `card${live === "online" ? "" : ` ${live}`}`, "data-worker": w.worker,
                    "data-online": String(live === "online"), "data-liveness": live },
    el("h3", {}, w.worker, status),
    el("div", { class: "where" }, `${w.host} · ${w.address || "?"} via broker ${w.broker || "?"} · ` +
      `${w.kinds.join(", ")} · ${w.cores} cores · heard ` +
      `${Math.round(age)} s ago`),
    el("div", { class: "figures" },
      el("span", { class: "label" }, "CPU"),
      sparkline(cpu, 100, `CPU of worker ${w.worker}, percent of one core, oldest first: ${cpu.join(", ")}`),
      el("span", { class: "value" }, `${w.cpu_percent.toFixed(0)} %`),
      el("span", { class: "label" }, "memory"),
      sparkline(memory, 0, `memory of worker ${w.worker} in megabytes, oldest first: ` +
        memory.map((m) => (m / 1048576).toFixed(0)).join(", ")),
      el("span", { class: "value" }, megabytes(w.memory_bytes)),
      el("span", { class: "label" }, "host"),
      el("span", { class: "small" }, `CPU ${w.host_cpu_percent.toFixed(0)} %, memory ${w.host_memory_percent.toFixed(0)} %`),
      el("span", { class: "value" }, `load ${w.load.toFixed(2)}`),
      ...(w.gpu_memory_total_bytes > 0 ? [
        el("span", { class: "label" }, "GPU"),
        el("span", { class: "small" }, `${megabytes(w.gpu_memory_bytes)} of ${megabytes(w.gpu_memory_total_bytes)}, ` +
          `${w.precision}`),
        el("span", { class: "value" }, w.gpu_percent == null ? "– %" : `${w.gpu_percent.toFixed(0)} %`),
      ] : []),
    ),
    el("p", { class: "small muted" }, `jobs: ${jobs}`),
  );
}

function queueRow(q) {
  const name = q.role === "jobs" ? `${q.kind}${q.route ? ` ${q.route}` : ""} jobs` : q.role;
  return el("tr", { "data-queue": q.name },
    el("th", { scope: "row" }, name),
    el("td", {}, q.ready), el("td", {}, q.unacked), el("td", {}, q.consumers),
    el("td", { class: "rate" }, rate(q.publish_rate)), el("td", { class: "rate" }, rate(q.deliver_rate)),
  );
}

function render(state) {
  $("#window").textContent = `last ${Math.round(state.window_seconds / 60)} minutes`;
  $("#kinds").replaceChildren(...Object.entries(state.kinds).map(
    ([name, k]) => kindCard(name, k, state.queues.history[name] || [])));

  const queues = state.queues;
  const error = $("#queues-error");
  error.hidden = !queues.error;
  error.textContent = queues.error ? `RabbitMQ's management API cannot be read: ${queues.error}` : "";
  $("#queues tbody").replaceChildren(...queues.queues.map(queueRow));

  workers = state.workers;
  receivedAt = Date.now();
  renderWorkers();
}

let workers = [], receivedAt = 0;
function renderWorkers() {
  const live = workers.map((w) => liveness(w, receivedAt));
  const online = live.filter((l) => l === "online").length, stale = live.filter((l) => l === "stale").length;
  $("#workers-count").textContent = `${online} online, ${stale ? `${stale} stale, ` : ""}` +
    `${workers.length - online - stale} offline`;
  $("#no-workers").hidden = workers.length > 0;
  $("#workers").replaceChildren(...workers.map(workerCard));
}

async function refresh() {
  const response = await fetch("/dashboard/state");
  if (response.ok) render(await response.json());
  resetPhrase();
}

// ---------------------------------------------------------------- reset
// The phrase to type names what goes: "delete 6 songs and 11 tasks" (counted just now).
async function resetPhrase() {
  try {
    const [songs, tasks, media] = await Promise.all(["/music", "/tasks", "/media"].map((path) => api("GET", path)));
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
    const phrase = `delete ${plural(songs.length, "song")} and ${plural(tasks.length, "task")}`;
    $("#reset-phrase").textContent = phrase;
    $("#reset-what").textContent = `${plural(songs.length, "song")}, ${plural(tasks.length, "task")} ` +
      `(songs included) and ${plural(media.length, "uploaded medium")}`.replace("mediums", "media");
    checkTyped();
  } catch (_) { /* offline: the banner says so */ }
}

function checkTyped() {
  $("#reset").disabled = $("#reset-confirm").value.trim() !== $("#reset-phrase").textContent;
}

$("#reset-confirm").addEventListener("input", checkTyped);
$("#reset-confirm").addEventListener("focus", resetPhrase);
$("#reset-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const token = $("#reset-token").value.trim();
  const status = $("#reset-status");
  status.textContent = "resetting…";
  try {
    const answer = await fetch("/reset", { method: "POST", headers: token ? { Authorization: `Bearer ${token}` } : {} });
    if (!answer.ok) throw new Error((await answer.json().catch(() => ({}))).error ?? answer.statusText);
    status.textContent = "Done: everything was deleted.";
    $("#reset-confirm").value = "";
    resetPhrase();
  } catch (error) {
    status.textContent = `Reset refused: ${error.message}`;
  }
});

connect({ dashboard: render }, refresh, "/dashboard/events");
setInterval(() => { if (!document.body.classList.contains("offline")) renderWorkers(); }, 500);
refresh();
