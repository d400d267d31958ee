// The farm as the musician's page shows it: one line of health (how many workers are
// online, stale or gone; the details are the dashboard's, at /dashboard), and the job
// timeline of the open song or video task. Liveness is js/liveness.js's, the dashboard's
// own rule: a worker silent past one heart-beat interval is stale at once (its running
// attempt drawn as stalled), past two it is offline (the server drops it). Job numbers are
// the same "#id" everywhere.
import { $, el, clock } from "./dom.js";
import { liveness } from "./liveness.js";

let workers = [];          // the latest snapshot, and when it arrived
let receivedAt = 0;

export function staleWorkers() {
  return new Set(workers.filter((w) => liveness(w, receivedAt) !== "online").map((w) => w.worker));
}

export function setWorkers(list) {
  workers = list;
  receivedAt = Date.now();
  renderWorkers();
}

export function renderWorkers() {
  const counts = { online: 0, stale: 0, offline: 0 };
  for (const w of workers) counts[liveness(w, receivedAt)] += 1;
  const line = $("#farm-health");
  for (const [key, n] of Object.entries(counts)) line.dataset[key] = n;
  const parts = [`${counts.online} worker${counts.online === 1 ? "" : "s"} online`];
  if (counts.stale) parts.push(`${counts.stale} not answering`);
  if (counts.offline) parts.push(`${counts.offline} gone`);
  $("#farm-text").textContent = counts.online === 0 && !counts.stale
    ? "No worker is online: processing waits until one starts." : parts.join(" · ");
  line.className = `farm-health ${counts.online === 0 ? "bad" : counts.stale || counts.offline ? "warn" : "ok"}`;
}

// What the timeline shows the jobs of: "song" or "video task", after the page's section.
let subject = "song";
export function timelineFor(what) {
  subject = what;
  $("#timeline-title").textContent = `Jobs of the open ${what}`;
  clearTimeline();
}

export function clearTimeline(text = `Open a ${subject} to see its jobs.`) {
  timelineRunning = false;
  $("#timeline").replaceChildren(el("p", { class: "muted" }, text));
}

// Whether the drawn timeline still has attempts that can change: it is redrawn as workers report.
export let timelineRunning = false;

export function drawTimeline(attempts) {
  const box = $("#timeline");
  timelineRunning = attempts.some((a) => a.outcome === "running");
  if (!attempts.length) { clearTimeline("No job has started yet."); return; }
  const stale = staleWorkers(), alive = new Set(workers.map((w) => w.worker));
  const names = [...new Set(attempts.map((a) => a.worker))];
  const now = Date.now() / 1000;
  const start = Math.min(...attempts.map((a) => a.started_at));
  const end = Math.max(...attempts.map((a) => a.ended_at || now));
  const span = Math.max(end - start, 0.001);
  const lanes = names.map((worker) => {
    const track = el("div", { class: "lane-track" });
    for (const a of attempts.filter((x) => x.worker === worker)) {
      // a running attempt on a worker that stopped heart-beating: the server calls it lost after its timeout
      const outcome = a.outcome === "running" && (stale.has(worker) || !alive.has(worker)) ? "stalled" : a.outcome;
      const seconds = (a.ended_at || now) - a.started_at;
      const bar = el("div", { class: `job ${outcome}`, "data-job": a.job_id,
                              title: `job #${a.job_id} on ${worker}: ${outcome}, ${clock(seconds)}` });
      // positions through the CSSOM: the Content-Security-Policy forbids inline style attributes
      bar.style.left = `${100 * (a.started_at - start) / span}%`;
      bar.style.width = `${Math.max(0.4, 100 * seconds / span)}%`;
      bar.dataset.label = `#${a.job_id}`;
      track.append(bar);
    }
    return el("div", { class: "lane" }, el("span", { class: "lane-name", title: worker }, worker), track);
  });
  const legend = el("div", { class: "legend muted" },
    ["done", "running", "stalled", "lost", "failed"].map((kind) =>
      el("span", {}, el("i", { class: `job ${kind}` }), ` ${kind} `)),
    el("span", {}, `· ${attempts.length} attempts, ${clock(span)}`));
  box.replaceChildren(...lanes, legend);
  labelWideBars(box);
}

// Text only on bars wide enough to hold it: at 150 jobs most bars are a few pixels wide,
// and overlapping labels were unreadable. Every bar keeps its label in its tooltip.
function labelWideBars(box) {
  for (const bar of box.querySelectorAll(".lane-track .job")) {
    bar.textContent = bar.getBoundingClientRect().width >= 8 * bar.dataset.label.length + 6 ? bar.dataset.label : "";
  }
}
