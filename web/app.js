// The page's entry point: it holds the songs' state (the songs, the open one, its player,
// the upload batches) and wires the modules together; the video section keeps its own
// (js/video.js). Data flows one way: the server (HTTP answers and live events) → `songs`
// → the render functions; user actions only ever call the server and wait for its answer
// to show up.
//   js/tabs.js     the two sections, Songs and Video, as tabs; the hash says which is open
//   js/library.js  the song list and the upload queue
//   js/song.js     the open song: instrument choice, stages and progress
//   js/player.js   the practice player (stems, original, tempo, key, loop, download mix)
//   js/operator.js the farm's health in one line (the details are the dashboard's) and the job timeline
//   js/connection.js  the live event stream, the offline banner, re-fetch on reconnect
//   js/shortcuts.js   the player's keyboard shortcuts
//   js/video.js       the video section: upload, run a task, follow it, cancel, reopen
//   js/kinds.js       a job kind's settings form, generated from GET /kinds
//   js/videotask.js   the open video and task: facts, progress, result players and figures
//   js/videoframes.js the open task in frames: each worker's share, the speed, faces per frame
//   js/videolist.js   the videos and their tasks, to reopen
//   js/upload.js      one file uploaded with its progress
// Plain JavaScript modules on purpose: the page works offline, with nothing to build.
import { api } from "./js/api.js";
import { $, showMessage } from "./js/dom.js";
import { UploadQueue, renderLibrary, setUpDropzone } from "./js/library.js";
import { clearTimeline, drawTimeline, renderWorkers, setWorkers, timelineFor, timelineRunning } from "./js/operator.js";
import { Player } from "./js/player.js";
import { chosenNames, renderSong, updateStartButton } from "./js/song.js";
import { connect } from "./js/connection.js";
import { installShortcuts } from "./js/shortcuts.js";
import { currentView, installTabs, onViewChange, selectView, viewOfHash } from "./js/tabs.js";
import * as video from "./js/video.js";

const songs = new Map();     // music_id -> latest status (or upload summary)
const waiting = new Map();   // music_id -> its upload batch, for songs uploaded here and not yet started
let selectedId = null;
let player = null;
const songsShown = () => currentView() === "songs";

// ---------------------------------------------------------------- songs

function open(id, { scroll = false } = {}) {
  if (selectedId !== id && player) { player.close(); player = null; }
  selectedId = id;
  if (songsShown()) {
    // reload and shared links open the same song (with its settings, kept in the fragment)
    if (Number(new URLSearchParams(location.hash.slice(1)).get("song")) !== id) history.replaceState(null, "", `#song=${id}`);
    clearTimeline("Loading…");
  }
  showList();
  api("GET", `/music/${id}`).then((status) => {
    onStatus(status);
    if (scroll) revealSong();
  }).catch((error) => {
    if (selectedId !== id) return;
    closeSong();
    showMessage($("#upload-message"), `Song ${id}: ${error.message}`);
  });
  refreshTimeline();
}

// On a phone the song panel is below the list: bring it into view.
function revealSong() {
  const panel = $("#song-panel");
  if (panel.getBoundingClientRect().top > window.innerHeight * 0.5 || panel.getBoundingClientRect().top < 0) {
    panel.scrollIntoView({ block: "start" });
  }
  panel.focus({ preventScroll: true });
}

function closeSong() {
  selectedId = null;
  if (player) { player.close(); player = null; }
  $("#song-panel").hidden = true;
  if (songsShown()) {
    history.replaceState(null, "", location.pathname);
    clearTimeline();
  }
  showList();
}

function showList() { renderLibrary(songs, selectedId, open); }

function onStatus(status) {
  const before = songs.get(status.music_id)?.state;
  songs.set(status.music_id, { ...songs.get(status.music_id), ...status });
  if (status.state !== "uploaded") waiting.delete(status.music_id);
  showList();
  if (status.music_id !== selectedId) return;
  renderSong(songs.get(selectedId), pendingInBatch(selectedId));
  if (status.state === "done" && (!player || player.songId !== status.music_id)) {
    if (player) player.close();
    player = new Player(songs.get(selectedId));
    // watched while it was processing: the focus goes to the player once it can play (unless
    // it is somewhere else on purpose: in the list, on the Video tab)
    if (before && before !== "done") {
      player.onReady = () => {
        const at = document.activeElement;
        if (at === document.body || $("#song-panel").contains(at)) $("#play").focus();
      };
    }
  }
}

function onDeleted(id) {
  songs.delete(id);
  waiting.delete(id);
  if (id === selectedId) closeSong(); else showList();
}

// ---------------------------------------------------------------- batches and start

function onUploaded(summary, batch) {
  songs.set(summary.music_id, summary);
  if (batch.choice) start(summary.music_id, batch.choice);   // the batch's choice was made already
  else waiting.set(summary.music_id, batch);
  if (batch.ids.length === 1) open(summary.music_id, { scroll: true });
  else showList();
  if (selectedId !== null && songs.has(selectedId)) updateStartButton(songs.get(selectedId), pendingInBatch(selectedId));
}

// Songs the Start button applies to: the open one, the others of its batch still waiting,
// and the batch's files still uploading.
function pendingInBatch(id) {
  const batch = waiting.get(id);
  if (!batch) return 1;
  return [...waiting.values()].filter((b) => b === batch).length + (batch.size - batch.ids.length);
}

async function start(id, names) {
  const song = songs.get(id);
  const ids = song.tracks?.length ? song.tracks : song.instruments;
  const keep = ids.filter((t) => names.includes(t.name)).map((t) => t.track_id);
  waiting.delete(id);
  try {
    await api("POST", `/music/${id}`, keep);
    onStatus(await api("GET", `/music/${id}`));
  } catch (error) {
    if (id === selectedId) showMessage($("#song-error"), error.message);
  }
}

function startClicked() {
  const names = chosenNames();
  if (!names.length || selectedId === null) return;
  const batch = waiting.get(selectedId);
  const targets = [selectedId, ...[...waiting].filter(([id, b]) => b === batch && id !== selectedId).map(([id]) => id)];
  if (batch) batch.choice = names;
  $("#song-panel").focus();   // the Start button is about to disappear: the focus stays in the song
  for (const id of targets) start(id, names);
}

async function deleteClicked() {
  const song = songs.get(selectedId);
  if (!song || !confirm(`Delete “${song.name}” and everything made from it?`)) return;
  try {
    await api("DELETE", `/music/${selectedId}`);
    onDeleted(song.music_id);
  } catch (error) {
    showMessage($("#song-error"), `could not delete: ${error.message}`);
  }
}

// ---------------------------------------------------------------- timeline and live figures

let timelineTimer = null;
function refreshTimeline() {
  if (timelineTimer) return;    // at most a few fetches a second, however many events arrive
  timelineTimer = setTimeout(async () => {
    timelineTimer = null;
    const id = selectedId;
    if (id === null || !songsShown()) return;
    try {
      const attempts = await api("GET", `/music/${id}/timeline`);
      if (id === selectedId && songsShown()) drawTimeline(attempts);
    } catch (_) { /* song gone, or server away: the banner says so */ }
  }, 300);
}

async function fetchEverything() {
  const list = await api("GET", "/music");
  songs.clear();
  for (const song of list) songs.set(song.music_id, song);
  for (const id of waiting.keys()) if (!songs.has(id)) waiting.delete(id);
  setWorkers(await api("GET", "/workers"));
  const wanted = selectedId ?? Number(new URLSearchParams(location.hash.slice(1)).get("song"));
  if (wanted && songs.has(wanted)) {
    if (wanted === selectedId) { onStatus(await api("GET", `/music/${wanted}`)); refreshTimeline(); }
    else open(wanted, { scroll: true });
  } else if (selectedId !== null) {
    closeSong();
  } else {
    showList();
  }
}

// ---------------------------------------------------------------- sections

function viewChanged(view) {
  if (view === "video") {
    player?.pause();
    video.showVideo();
    return;
  }
  video.hideVideo();
  timelineFor("song");
  if (selectedId !== null) {
    if (Number(new URLSearchParams(location.hash.slice(1)).get("song")) !== selectedId) {
      history.replaceState(null, "", `#song=${selectedId}`);
    }
    refreshTimeline();
  } else if (viewOfHash() === "video") {   // a #song=N is kept: it names the song to open
    history.replaceState(null, "", location.pathname);
  }
}

// ---------------------------------------------------------------- start-up

async function main() {
  setUpDropzone(new UploadQueue(onUploaded));
  $("#start").addEventListener("click", startClicked);
  $("#instrument-choices").addEventListener("change", () => {
    if (selectedId !== null) updateStartButton(songs.get(selectedId), pendingInBatch(selectedId));
  });
  $("#delete-song").addEventListener("click", deleteClicked);
  $("#play").addEventListener("click", () => player?.toggle());
  $("#compare").addEventListener("click", () => player?.toggleCompare());
  $("#loop-a").addEventListener("click", () => player?.setLoopA());
  $("#loop-b").addEventListener("click", () => player?.setLoopB());
  $("#loop-clear").addEventListener("click", () => player?.clearLoop());
  $("#loop").addEventListener("click", () => player?.toggleLoop());
  $("#seek").addEventListener("input", (e) => player?.seek(Number(e.target.value)));
  $("#tempo").addEventListener("input", (e) => player?.setTempo(Number(e.target.value)));
  $("#key").addEventListener("input", (e) => player?.setKey(Number(e.target.value)));
  $("#download-mix").addEventListener("click", () => player?.downloadMix());
  window.addEventListener("hashchange", () => {
    selectView(viewOfHash());
    if (!songsShown()) { video.openFromHash(); return; }
    const id = Number(new URLSearchParams(location.hash.slice(1)).get("song"));
    if (id && id !== selectedId) open(id, { scroll: true });
  });
  installShortcuts(() => (songsShown() ? player : null));
  video.initVideo();
  onViewChange(viewChanged);
  installTabs();

  const live = connect({
    music: (status) => { onStatus(status); if (status.music_id === selectedId) refreshTimeline(); },
    workers: (data) => {
      setWorkers(data.workers);
      if (selectedId !== null && (songs.get(selectedId)?.state === "processing" || timelineRunning)) refreshTimeline();
      if (!songsShown()) video.onWorkers();
    },
    task: video.onTask,
    deleted: (data) => onDeleted(data.music_id),
    reset: () => { songs.clear(); waiting.clear(); closeSong(); video.onReset(); },
  }, () => { fetchEverything().catch(() => live.lost()); video.refresh(); });
  setInterval(() => {   // ages and elapsed times move on between events
    if (document.body.classList.contains("offline")) return;
    renderWorkers();
    video.tick();
    const song = songs.get(selectedId);
    if (song?.state === "processing") renderSong(song, pendingInBatch(selectedId));
  }, 500);
  try { await fetchEverything(); } catch (_) { live.lost(); }
}

main();
