// The open song's panel: which instruments to keep, the stages of its processing (waiting
// for its decode, separating on the workers, merging the stems) with a real progress bar,
// and its error. What the panel shows comes only from the song's status object.
import { $, el, clock, showMessage } from "./dom.js";

export function renderSong(status, pendingInBatch) {
  $("#song-panel").hidden = false;
  $("#song-title").textContent = status.name;
  $("#song-meta").textContent = `${status.band || "unknown band"} · ${clock(status.duration)}` +
    (status.jobs_total ? ` · ${status.jobs_total} jobs` : "");
  const badge = $("#song-state");
  badge.textContent = status.state;
  badge.className = `state ${status.state}`;

  const choosing = status.state === "uploaded" || status.state === "failed";
  $("#choose").hidden = !choosing;
  const choices = $("#instrument-choices");
  if (choosing && choices.dataset.song !== String(status.music_id)) {
    choices.dataset.song = status.music_id;
    const kept = status.selection ? new Set(status.selection) : null;
    choices.replaceChildren(...status.instruments.map((instrument) =>
      el("label", { class: "choice" },
         el("input", { type: "checkbox", value: instrument.track_id, "data-name": instrument.name,
                       checked: kept ? kept.has(instrument.track_id) : instrument.name !== "vocals" }),
         instrument.name)));
  }
  updateStartButton(status, pendingInBatch);

  const stage = stageOf(status);
  $("#progress-block").hidden = !stage;
  if (stage) {
    $("#stage").textContent = stage.text;
    const bar = $("#song-progress");
    if (stage.value === null) bar.removeAttribute("value"); else bar.value = stage.value;
    $("#progress-percent").textContent = stage.value === null ? "" : `${stage.value}%`;
    $("#progress-times").textContent = times(status, stage);
  }
  announce(status, stage);
  showMessage($("#song-error"), status.state === "failed" ? `Processing failed: ${status.error}` : "");
  $("#player").hidden = status.state !== "done";
}

export function updateStartButton(status, pendingInBatch) {
  const ticked = chosenNames().length;
  const start = $("#start");
  start.disabled = ticked === 0;
  const others = pendingInBatch - 1;
  start.textContent = status.state === "failed" ? "Try again"
    : others > 0 ? `Start this and ${others} more song${others > 1 ? "s" : ""}` : "Start";
  $("#choose-hint").textContent = ticked === 0 ? "Tick at least one instrument: a mix of nothing is silence."
    : others > 0 ? "The same instruments are kept in every song of this upload." : "";
}

export function chosenNames() {
  return [...document.querySelectorAll("#instrument-choices input:checked")].map((i) => i.dataset.name);
}

// The stage a song is in, for the progress bar: null value = no measure of it (indeterminate).
function stageOf(status) {
  if (status.state === "processing" && !status.jobs_total) return { text: "Waiting for the upload to be decoded", value: null };
  if (status.state === "processing" && status.jobs_done < status.jobs_total) {
    return { text: `Separating on the workers: ${status.jobs_done} of ${status.jobs_total} jobs`,
             value: Math.round(100 * status.jobs_done / status.jobs_total) };
  }
  if (status.state === "processing") return { text: "Merging the stems", value: null, merging: true };
  if (status.state === "done") return { text: "Done", value: 100 };
  return null;
}

function times(status, stage) {
  if (!status.started_at) return "";
  const now = Date.now() / 1000;
  const elapsed = (status.finished_at || now) - status.started_at;
  if (status.state === "done") return `took ${clock(elapsed)}`;
  if (stage.merging) return `elapsed ${clock(elapsed)} · every job is in; the merge writes the stems`;
  if (stage.value > 0) {
    const left = elapsed * (100 - stage.value) / stage.value;
    return `elapsed ${clock(elapsed)} · about ${clock(left)} left for the jobs, then the merge`;
  }
  return `elapsed ${clock(elapsed)}`;
}

// The polite live region says each change of stage once (not every job's count): a screen
// reader hears "Separating on the workers", "Merging the stems", "Done: the player is ready".
let announced = "";
function announce(status, stage) {
  const said = status.state === "failed" ? `Processing failed: ${status.error}`
    : status.state === "done" ? `${status.name}: done, the player is ready`
    : stage ? `${status.name}: ${stage.text.split(":")[0]}` : "";
  const key = `${status.music_id} ${said}`;
  if (key === announced) return;
  const first = announced === "" || !announced.startsWith(`${status.music_id} `);
  announced = key;
  if (!first) $("#announce").textContent = said;   // opening a song is not a change of stage
}
