// The open video: its facts and the original's player, and the open task on it: stage and
// progress (from the task's status only), Cancel while it runs, and once done the result's
// player beside the original's, its figures (size, bitrate, frames; faces found, for a kind
// that finds them) and a download link.
import { $, el, bitrate, bytes, clock, seconds, showMessage } from "./dom.js";
import { valueLabel } from "./kinds.js";
import { renderFaces } from "./videoframes.js";

const ACTIVE = new Set(["queued", "running"]);
// What the workers do to a kind's pieces, for the progress line.
const WORK = { transcode: "Encoding on the workers", faceblur: "Finding and hiding faces on the workers" };
// The result's caption beside "Original".
const RESULT = { faceblur: "Faces hidden" };
const MIME = { h264: 'video/mp4; codecs="avc1.42E01E"', hevc: 'video/mp4; codecs="hvc1.1.6.L93.B0"',
               vp9: 'video/webm; codecs="vp9"', av1: 'video/mp4; codecs="av01.0.05M.08"' };

export const isActive = (task) => ACTIVE.has(task?.state);
// HTTP answers give absolute addresses, live events relative ones: compare them as absolute.
const absolute = (url) => (url ? new URL(url, location.href).href : null);

// Whether this browser can play a codec (unknown codecs: assume it can, the player will say).
export function canPlay(codec) {
  const mime = MIME[String(codec).toLowerCase()];
  return !mime || document.createElement("video").canPlayType(mime) !== "";
}

export function installResultPlayer() {
  $("#result-video").addEventListener("error", () => {
    if (!$("#result-video").getAttribute("src")) return;
    $("#result-note").textContent = "This browser could not play the result: download it to watch it.";
  });
  $("#play-both").addEventListener("click", playBoth);
}

// Both players from the same moment, to compare them side by side.
function playBoth() {
  const original = $("#original-video"), result = $("#result-video");
  if (!original.paused || !result.paused) { original.pause(); result.pause(); return; }
  original.currentTime = result.currentTime;
  original.play().catch(() => {});
  result.play().catch(() => {});
}

export function renderMedia(media) {
  $("#video-title").textContent = media.name;
  const video = media.video;
  $("#video-facts").replaceChildren(...facts("data-fact", [
    ["resolution", "resolution", video ? `${video.width}×${video.height}` : "–"],
    ["fps", "frame rate", video ? `${+Number(video.fps).toFixed(3)} fps` : "–"],
    ["frames", "frames", video?.frames ?? "–"],
    ["duration", "duration", seconds(media.duration)],
    ["codec", "codec", video ? valueLabel(video.codec) : "–"],
    ["size", "size", bytes(media.size)],
    ["audio", "sound", media.audio ? valueLabel(media.audio.codec) : "none"],
  ]));
  setSource($("#original-video"), absolute(media.url));
}

export function renderTask(task, media) {
  const badge = $("#video-state");
  badge.hidden = !task;
  $("#task-progress").hidden = !task;
  $("#result-figure").hidden = task?.state !== "done";
  showMessage($("#task-error"), task?.state === "failed" ? `The task failed: ${task.error || "no reason given"}` : "");
  if (!task) { setSource($("#result-video"), null); renderFaces(null); return; }
  badge.textContent = task.state;
  badge.className = `state ${task.state}`;

  const stage = task.waiting ? { text: `Waiting: ${task.waiting}`, value: null } : stageOf(task);
  $("#task-stage").textContent = stage.text;
  const bar = $("#task-bar");
  if (stage.value === null) bar.removeAttribute("value"); else bar.value = stage.value;
  $("#task-percent").textContent = stage.value === null ? "" : `${stage.value}%`;
  $("#task-jobs").textContent = [task.jobs_total ? `${task.jobs_done} of ${task.jobs_total} jobs done` : "",
                                   times(task)].filter(Boolean).join(" · ");
  $("#cancel-task").hidden = !isActive(task);

  if (task.state === "done") renderResult(task, media);
  else { setSource($("#result-video"), null); renderFaces(null); }
}

function renderResult(task, media) {
  const output = task.outputs?.find((o) => o.name === "video") ?? task.outputs?.[0];
  const url = absolute(output?.url);
  const stats = task.stats || {};
  const playable = canPlay(stats.codec);
  $("#result-caption").textContent = RESULT[task.kind] ?? "Result";
  setSource($("#result-video"), playable ? url : null);
  $("#result-video").hidden = !playable;
  $("#play-both").hidden = !playable;
  $("#result-note").textContent = playable ? ""
    : `This browser cannot play ${valueLabel(stats.codec)}: download the result to watch it.`;
  const link = $("#result-download");
  link.hidden = !url;
  if (url) link.href = `${url}?download=1`;   // as an attachment, named by the server
  link.textContent = `Download${stats.size ? ` (${bytes(stats.size)})` : ""}`;
  const share = stats.size && media?.size ? ` (${Math.round(100 * stats.size / media.size)}% of the original)` : "";
  $("#result-stats").replaceChildren(...facts("data-stat", [
    ["size", "size", stats.size == null ? "–" : `${bytes(stats.size)}${share}`],
    ["bitrate", "bitrate", bitrate(stats.bitrate)],
    ["frames", "frames", stats.frames ?? "–"],
    ["duration", "duration", seconds(stats.duration)],
    ["codec", "codec", stats.codec ? valueLabel(stats.codec) : "–"],
    ["resolution", "resolution", stats.width ? `${stats.width}×${stats.height}` : "–"],
    ["energy", "energy", energy(stats.energy)],
    ["cache", "from the cache", cached(stats.cache)],
    ["serial", "server's share", serial(stats.serial)],
    ...(stats.faces ? [["faces", "faces", faces(stats.faces, stats.frames)]] : []),
    ...(Number.isFinite(stats.ms_per_frame)
      ? [["ms-per-frame", "detect and mask", `${stats.ms_per_frame.toFixed(1)} ms per frame`]] : []),
  ]));
  renderFaces(stats.faces, stats.frames);
}

function faces(found, frames) {
  if (!frames) return "–";
  return `in ${found.frames_with_faces} of ${frames} frames, at most ${found.max} in one`;
}

// Joules, and how they were known: "estimated" where the workers cannot read RAPL.
function energy(spent) {
  if (!spent) return "–";
  if (spent.source === "cached") return "none (from the cache)";
  const perFrame = spent.joules_per_frame == null ? "" : `, ${spent.joules_per_frame.toFixed(3)} J/frame`;
  return `${spent.joules.toFixed(1)} J${perFrame} (${spent.source})`;
}

// The server's own CPU (prepare, check, merge...) against the workers': the task's serial share.
function serial(spent) {
  if (!spent || spent.share == null) return "–";
  return `${(100 * spent.share).toFixed(1)}% of the CPU (server ${spent.server_cpu_seconds.toFixed(2)} s, ` +
    `workers ${spent.workers_cpu_seconds.toFixed(2)} s)`;
}

function cached(cache) {
  if (!cache) return "–";
  if (cache.task) return "the whole result";
  return cache.jobs ? `${cache.jobs} of ${cache.of} chunks` : "nothing";
}

// The stage a task is in, for the progress bar: null value = no measure of it (indeterminate).
function stageOf(task) {
  const percent = Math.max(0, Math.min(100, Math.round(task.progress ?? 0)));
  switch (task.state) {
    case "queued": return { text: "Queued: waiting for a worker", value: null };
    case "running":
      if (!task.jobs_total) return { text: "Cutting the video into pieces", value: null };
      if (task.jobs_done < task.jobs_total) return { text: WORK[task.kind] ?? "Working on the pieces", value: percent };
      return { text: "Joining the pieces", value: percent < 100 ? percent : null };
    case "done": return { text: "Done", value: 100 };
    case "cancelled": return { text: "Cancelled", value: percent };
    case "failed": return { text: "Failed", value: percent };
    default: return { text: task.state, value: percent };
  }
}

function times(task) {
  if (!task.started_at) return "";
  const elapsed = (task.finished_at || Date.now() / 1000) - task.started_at;
  return task.finished_at ? `took ${clock(elapsed)}` : `running for ${clock(elapsed)}`;
}

// <div><dt>label</dt><dd>value</dd></div> rows of a <dl>, each marked `attribute="key"`.
function facts(attribute, rows) {
  return rows.map(([key, label, value]) => el("div", { [attribute]: key }, el("dt", {}, label), el("dd", {}, value)));
}

// A player's source, set only when it changes: a status update must not restart playback.
function setSource(video, url) {
  if ((video.dataset.src ?? "") === (url ?? "")) return;
  video.dataset.src = url ?? "";
  if (url) video.src = url;
  else { video.removeAttribute("src"); video.load(); }
}
