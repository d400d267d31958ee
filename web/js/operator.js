// The operator's view, kept apart from the musician's flow: the live worker panel (with the
// job kinds each worker runs) and the job timeline of the open song or video task. A worker whose heart-beat is older than its interval is shown
// stale at once (the server drops it only after two intervals), and its running attempt is
// drawn as stalled; job numbers are the same "#id" in both places.
import { $, el, clock } from "./dom.js";

let workers = [];          // the latest snapshot, and when it arrived
let receivedAt = 0;
const SLACK_SECONDS = 0.5;   // a live worker's presence is at most one interval old, plus its delivery

export function staleWorkers() {
  return new Set(workers.filter((w) => age(w) > w.heartbeat_seconds + SLACK_SECONDS).map((w) => w.worker));
}

function age(worker) {
  return worker.last_heartbeat_age + (Date.now() - receivedAt) / 1000;
}

export function setWorkers(list) {
  workers = list;
  receivedAt = Date.now();
  renderWorkers();
}

export function renderWorkers() {
  const stale = staleWorkers();
  $("#worker-count").textContent = workers.length;
  $("#workers-empty").hidden = workers.length > 0;
  $("#workers").replaceChildren(...workers.map((w) => {
    const state = stale.has(w.worker) ? "stale" : w.state;
    return el("tr", { class: state, "data-pid": w.pid, "data-worker": w.worker },
      el("td", {}, w.worker), el("td", {}, w.host), el("td", {}, w.address), el("td", {}, w.pid),
      el("td", {}, w.device),
      el("td", {}, el("span", { class: `state ${state}`,
                                title: state === "stale" ? "no heart-beat: crashed or hung; dropped soon" : null },
                      state === "stale" ? "stale" : w.state)),
      el("td", {}, jobOf(w)), el("td", {}, w.kinds?.length ? w.kinds.join(", ") : "–"), el("td", {}, w.jobs_done),
      el("td", {}, w.mean_job_seconds == null ? "–" : `${w.mean_job_seconds.toFixed(1)}s`),
      el("td", {}, `${age(w).toFixed(1)}s ago`));
  }));
}

// "#12 (task 3)": the job, and the task (or song, from a server of before tasks) it is part of.
function jobOf(worker) {
  if (worker.job_id == null) return "–";
  if (worker.task_id != null) return `#${worker.job_id} (task ${worker.task_id})`;
  return worker.music_id != null ? `#${worker.job_id} (song ${worker.music_id})` : `#${worker.job_id}`;
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
