// The open video task counted in frames: who did what (`GET /tasks/{id}/workers`, per worker
// its address, frames done, frames it is on now and its mean time per frame, plus the frames
// nobody has started), the task's speed in frames per second, and, for a kind that finds
// faces, the faces found in each frame as a small bar chart with a text alternative.
// The server counts a job's share in media seconds; seconds × the video's frame rate are
// frames (exact for the video kinds, whose jobs are runs of whole frames).
import { $, el, svgEl } from "./dom.js";

const MAX_GAPS = 6;         // frames without a face listed by the text alternative, as ranges

// A frame rate as the server gives it: a number (25, 29.97) or an exact fraction "30000/1001".
export function frameRate(fps) {
  if (typeof fps === "string" && fps.includes("/")) {
    const [top, bottom] = fps.split("/").map(Number);
    return bottom ? top / bottom : NaN;
  }
  return Number(fps);
}

const framesOf = (seconds, rate) => (Number.isFinite(rate) && rate > 0 ? Math.round(seconds * rate) : NaN);
const count = (value) => (Number.isFinite(value) ? value.toLocaleString("en") : "–");

// The per-worker table and the task's frame figures. `shares` is the last answer of
// GET /tasks/{id}/workers for this task (null: none yet); `now` in Unix seconds.
export function renderShares(task, media, shares, now = Date.now() / 1000) {
  const block = $("#task-shares");
  block.hidden = !task || !media?.video;
  if (block.hidden) return;
  const rate = frameRate(media.video.fps);
  // A job is in progress once: on the worker that started it last. A worker that died in it
  // keeps a running attempt until the server calls it lost (two heart-beats), while another
  // worker already redoes the job; counting both made "300 in progress" of a 150-frame clip.
  const latest = new Map();
  for (const w of shares?.workers ?? []) {
    if (!w.running || w.alive === false) continue;
    const other = latest.get(w.running.job_id);
    if (!other || w.running.started_at > other.running.started_at) latest.set(w.running.job_id, w);
  }
  const rows = (shares?.workers ?? []).map((w) => {
    const done = framesOf(w.seconds_done, rate);
    const counted = w.running && latest.get(w.running.job_id) === w;
    const running = counted ? framesOf(w.running.seconds, rate) : 0;
    return { w, done, running, lost: Boolean(w.running) && !counted, msPerFrame: done > 0 ? w.compute_ms / done : NaN };
  });
  const done = rows.reduce((sum, r) => sum + r.done, 0);
  const running = rows.reduce((sum, r) => sum + r.running, 0);
  const pending = shares ? framesOf(shares.pending.seconds, rate) : NaN;
  const computeMs = rows.reduce((sum, r) => sum + r.w.compute_ms, 0);

  $("#task-workers").replaceChildren(...rows.map(({ w, done: frames, running: busy, lost, msPerFrame }) =>
    el("tr", { "data-worker": w.worker, class: w.alive ? null : "gone" },
      el("td", { "data-col": "worker", class: "name" }, w.worker),
      // the server knows a worker's address only while it is alive
      el("td", { "data-col": "address" }, w.address ?? "gone"),
      el("td", { "data-col": "done", "data-frames": frames }, count(frames)),
      // "#14": the job's number, as the operator panel and the timeline write it
      el("td", { "data-col": "running", "data-frames": busy, title: w.running ? `job #${w.running.job_id}` : null },
        lost ? `lost (#${w.running.job_id}, redone elsewhere)` : w.running ? `${count(busy)} (#${w.running.job_id})` : "–"),
      el("td", { "data-col": "ms-per-frame" }, perFrame(msPerFrame)))));
  // the sums only where there is something to sum
  $("#task-workers-total").replaceChildren(...(rows.length < 2 ? [] : [el("tr", {},
    el("td", { class: "name" }), el("th", { scope: "row" }, "all workers"),
    el("td", { "data-col": "done", "data-frames": done }, count(done)),
    el("td", { "data-col": "running", "data-frames": running }, running ? count(running) : "–"),
    el("td", { "data-col": "ms-per-frame" }, perFrame(done > 0 ? computeMs / done : NaN)))]));
  $("#task-workers-empty").hidden = rows.length > 0;
  $("#task-workers-empty").textContent = !shares ? "Loading…"
    : task.state === "done" ? "No worker computed any of it: it all came from the cache."
    : "No worker has started a job of it yet.";

  const total = Number.isFinite(task.stats?.frames) ? task.stats.frames : media.video.frames;
  const cached = task.state === "done" && shares ? total - done - running - pending : 0;
  $("#task-figures").replaceChildren(...[
    ["speed", "speed", speed(task, done, now)],
    ["done", "frames done", shares ? `${count(done)} of ${count(total)}` : "–"],
    ["pending", "not started", shares ? framesAndJobs(pending, shares.pending.jobs) : "–"],
    cached > 0 ? ["cached", "from the cache", `${count(cached)} frames`] : null,
  ].filter(Boolean).map(([key, label, value]) =>
    el("div", { "data-figure": key }, el("dt", {}, label), el("dd", {}, value))));
}

// Frames per second over the task's whole run once it is done (every frame it has, from its
// first queued job to its output), and live the frames done so far over the time so far.
function speed(task, doneFrames, now) {
  if (!task.started_at) return "–";
  const finished = task.state === "done" && task.finished_at;
  const frames = finished ? task.stats?.frames : doneFrames;
  const elapsed = (finished ? task.finished_at : now) - task.started_at;
  if (!Number.isFinite(frames) || !(elapsed > 0) || (!finished && frames === 0)) return "–";
  const fps = frames / elapsed;
  return `${fps >= 100 ? Math.round(fps) : fps.toFixed(1)} frames/s`;
}

function perFrame(ms) {
  if (!Number.isFinite(ms)) return "–";
  return `${ms >= 100 ? Math.round(ms) : ms.toFixed(1)} ms`;
}

function framesAndJobs(frames, jobs) {
  if (!jobs) return "none";
  return `${count(frames)} frames (${jobs} job${jobs === 1 ? "" : "s"})`;
}

// ---------------------------------------------------------------- faces per frame

// `faces`: the stats' {chart: [the most faces in each run of frames_per_bar frames], frames_per_bar,
// frames_with_faces, max}; `frames`: the video's. (The server bounds the chart's length, so a long
// video's stats stay small; every frame's figures are the task's `records` output.) null hides it.
export function renderFaces(faces, frames) {
  const figure = $("#faces-figure");
  const values = Array.isArray(faces?.chart) ? faces.chart : null;
  figure.hidden = !values?.length;
  if (figure.hidden) { $("#faces-chart").replaceChildren(); delete figure.dataset.drawn; return; }
  const group = Math.max(1, faces.frames_per_bar ?? 1);
  const total = frames ?? values.length * group;
  const text = facesText(values, group, total, faces);
  if (figure.dataset.drawn === text) return;   // a status update redraws nothing that did not change
  figure.dataset.drawn = text;
  $("#faces-text").textContent = text;

  const top = Math.max(1, faces.max ?? largest(values));
  // Frames without a face are drawn as a short bar of their own colour: in an anonymised video
  // they are where a missed face would show, so they must stand out rather than vanish.
  const stub = top * 0.08;
  const svg = $("#faces-chart");
  svg.setAttribute("viewBox", `0 0 ${values.length} ${top}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.dataset.frames = total;
  svg.dataset.bars = values.length;
  svg.replaceChildren(...values.map((value, index) => {
    const height = value > 0 ? value : stub;
    const rect = svgEl("rect", { x: index + 0.1, width: 0.8, y: top - height, height,
                                   class: value > 0 ? "found" : "none", "data-faces": value });
    const first = index * group;
    const last = Math.min(first + group, total);
    const span = last - first === 1 ? `frame ${first + 1}` : `frames ${first + 1}–${last}`;
    rect.append(svgEl("title", {}, `${span}: ${value ? `${value} face${value === 1 ? "" : "s"}` : "no face"}`));
    return rect;
  }));
}

// "faces in 48 of 50 frames, at most 1; none found in frames 3–4": the chart in words.
function facesText(values, group, frames, faces) {
  const withFaces = faces.frames_with_faces ?? values.filter((n) => n > 0).length * group;
  const most = faces.max ?? largest(values);
  let text = `faces in ${count(withFaces)} of ${count(frames)} frames, at most ${most}`;
  const gaps = [];
  for (let i = 0; i < values.length; i += 1) {
    if (values[i] > 0) continue;
    const start = i;
    while (i + 1 < values.length && values[i + 1] === 0) i += 1;
    const first = start * group + 1;
    const last = Math.min((i + 1) * group, frames);
    gaps.push(first === last ? `${first}` : `${first}–${last}`);
  }
  if (gaps.length && withFaces > 0) {
    text += `; none found in frame${gaps.length === 1 && !gaps[0].includes("–") ? "" : "s"} `
      + gaps.slice(0, MAX_GAPS).join(", ") + (gaps.length > MAX_GAPS ? ` and ${gaps.length - MAX_GAPS} more runs` : "");
  }
  return text;
}

// Math.max(...list) would pass every frame as an argument: a long video's list is too many.
const largest = (list) => list.reduce((most, n) => (n > most ? n : most), 0);

