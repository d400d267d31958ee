// The karaoke page: library and upload, processing with live progress (Server-Sent
// Events), an in-browser stem mixer (Web Audio), the workers panel and job timelines.
// Plain JavaScript on purpose: the page works offline, with nothing to build.
"use strict";

const $ = (selector) => document.querySelector(selector);
const songs = new Map();          // music_id -> latest status or summary
let selectedId = null;
let mixer = null;

// ---------------------------------------------------------------- helpers

async function api(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function clock(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  if (seconds < 10 && seconds % 1 !== 0) return `${seconds.toFixed(1)}s`;
  const m = Math.floor(seconds / 60), s = Math.floor(seconds % 60);
  return `${m}:${String(s).padStart(2, "0")}`;
}

function showMessage(node, text, kind = "error") {
  node.textContent = text;
  node.className = `message ${kind}`;
  node.hidden = !text;
}

// ---------------------------------------------------------------- library and upload

function renderLibrary() {
  const list = $("#library");
  list.replaceChildren();
  const items = [...songs.values()].sort((a, b) => b.music_id - a.music_id);
  $("#library-empty").hidden = items.length > 0;
  for (const song of items) {
    const item = el("li", { class: song.music_id === selectedId ? "selected" : "", "data-id": song.music_id,
                            onclick: () => selectSong(song.music_id) },
      el("div", { class: "title" }, song.name, song.band ? el("span", { class: "muted" }, ` — ${song.band}`) : ""),
      el("div", { class: "meta" }, el("span", {}, clock(song.duration)),
         el("span", { class: `state ${song.state}` }, song.state),
         song.state === "processing" ? el("span", {}, `${song.progress}%`) : ""));
    list.append(item);
  }
}

function upload(file) {
  const zone = $("#dropzone"), box = zone.querySelector(".upload-progress");
  const fill = box.querySelector(".fill"), label = box.querySelector(".label");
  showMessage($("#upload-message"), "");
  box.hidden = false;
  const request = new XMLHttpRequest();   // fetch() cannot report upload progress
  request.open("POST", "/music");
  request.setRequestHeader("Content-Type", "application/octet-stream");
  request.setRequestHeader("X-Filename", encodeURIComponent(file.name));
  request.upload.onprogress = (event) => {
    if (!event.lengthComputable) return;
    const percent = Math.round(100 * event.loaded / event.total);
    fill.style.width = `${percent}%`;
    label.textContent = percent < 100 ? `Uploading ${file.name}: ${percent}%` : `Checking ${file.name}…`;
  };
  request.onload = () => {
    box.hidden = true;
    let data = {};
    try { data = JSON.parse(request.responseText); } catch (_) { /* keep {} */ }
    if (request.status !== 200) {
      showMessage($("#upload-message"), `${file.name} was refused: ${data.error || request.statusText}`);
      return;
    }
    songs.set(data.music_id, data);
    renderLibrary();
    selectSong(data.music_id);
  };
  request.onerror = () => {
    box.hidden = true;
    showMessage($("#upload-message"), `Uploading ${file.name} failed: the server did not answer.`);
  };
  request.send(file);
}

function setUpDropzone() {
  const zone = $("#dropzone"), input = $("#file-input");
  input.addEventListener("change", () => { if (input.files[0]) upload(input.files[0]); input.value = ""; });
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.remove("over"); });
  }
  zone.addEventListener("drop", (e) => { if (e.dataTransfer.files[0]) upload(e.dataTransfer.files[0]); });
}

// ---------------------------------------------------------------- one song

async function selectSong(id) {
  selectedId = id;
  if (mixer) { mixer.stop(); mixer = null; }
  $("#mixer").replaceChildren();
  renderLibrary();
  try {
    renderSong(await api("GET", `/music/${id}`));
  } catch (error) {
    showMessage($("#song-error"), error.message);
  }
  refreshTimeline(id);
}

function renderSong(status) {
  songs.set(status.music_id, { ...songs.get(status.music_id), ...status });
  renderLibrary();
  if (status.music_id !== selectedId) return;
  $("#song-panel").hidden = false;
  $("#song-title").textContent = status.name;
  $("#song-meta").textContent = `${status.band || "unknown band"} · ${clock(status.duration)} · ` +
    `${status.jobs_total || 0} jobs`;
  const stateBadge = $("#song-state");
  stateBadge.textContent = status.state;
  stateBadge.className = `state ${status.state}`;

  const choosing = status.state === "uploaded" || status.state === "failed";
  $("#choose").hidden = !choosing;
  if (choosing && $("#instrument-choices").dataset.song !== String(status.music_id)) {
    const choices = $("#instrument-choices");
    choices.dataset.song = status.music_id;
    choices.replaceChildren(...status.instruments.map((instrument) =>
      el("label", { class: "choice" },
         el("input", { type: "checkbox", value: instrument.track_id, checked: instrument.name !== "vocals" }),
         instrument.name)));
  }
  $("#start").textContent = status.state === "failed" ? "Try again" : "Start";

  const working = status.state === "processing";
  $("#progress-block").hidden = !working && status.state !== "done";
  $("#song-progress").style.width = `${status.progress}%`;
  $("#progress-percent").textContent = `${status.progress}%`;
  updateTimes(status);
  showMessage($("#song-error"), status.state === "failed" ? `Processing failed: ${status.error}` : "");

  $("#mixer-block").hidden = status.state !== "done";
  if (status.state === "done" && (!mixer || mixer.songId !== status.music_id)) {
    mixer = new Mixer(status);
  }
}

function updateTimes(status) {
  const node = $("#progress-times");
  if (!status.started_at) { node.textContent = ""; return; }
  const end = status.finished_at || Date.now() / 1000;
  const elapsed = end - status.started_at;
  if (status.state === "done") {
    node.textContent = `took ${clock(elapsed)}`;
  } else if (status.state === "processing") {
    const left = status.progress > 0 ? elapsed * (100 - status.progress) / status.progress : NaN;
    node.textContent = `elapsed ${clock(elapsed)} · about ${clock(left)} left`;
  } else {
    node.textContent = "";
  }
}

async function startProcessing() {
  const ids = [...document.querySelectorAll("#instrument-choices input:checked")].map((i) => Number(i.value));
  try {
    await api("POST", `/music/${selectedId}`, ids);
    renderSong(await api("GET", `/music/${selectedId}`));
  } catch (error) {
    showMessage($("#song-error"), error.message);
  }
}

// ---------------------------------------------------------------- timeline

let timelineTimer = null;
function refreshTimeline(id) {
  if (timelineTimer) return;    // at most a few fetches a second, however many events arrive
  timelineTimer = setTimeout(async () => {
    timelineTimer = null;
    if (id !== selectedId) return;
    try { drawTimeline(await api("GET", `/music/${id}/timeline`)); } catch (_) { /* song gone */ }
  }, 300);
}

function drawTimeline(attempts) {
  const box = $("#timeline");
  if (!attempts.length) { box.replaceChildren(el("p", { class: "muted" }, "No job has started yet.")); return; }
  const workers = [...new Set(attempts.map((a) => a.worker))];
  const now = Date.now() / 1000;
  const start = Math.min(...attempts.map((a) => a.started_at));
  const end = Math.max(...attempts.map((a) => a.ended_at || now));
  const span = Math.max(end - start, 0.001);
  const lanes = workers.map((worker) => el("div", { class: "lane" },
    el("span", { class: "lane-name" }, worker),
    el("div", { class: "lane-track" }, attempts.filter((a) => a.worker === worker).map((a) => {
      const left = 100 * (a.started_at - start) / span;
      const width = Math.max(0.6, 100 * ((a.ended_at || now) - a.started_at) / span);
      const bar = el("div", { class: `job ${a.outcome}`,
                              title: `job ${a.job_id} (chunk ${a.chunk}) on ${worker}: ${a.outcome}` }, `#${a.chunk}`);
      // set through the CSSOM: the Content-Security-Policy forbids inline style attributes
      Object.assign(bar.style, { left: `${left}%`, width: `${width}%` });
      return bar;
    }))));
  const legend = el("div", { class: "legend muted" }, "done", el("i", { class: "job done" }), " running ",
                    el("i", { class: "job running" }), " lost (worker died or hung) ", el("i", { class: "job lost" }),
                    " failed ", el("i", { class: "job failed" }));
  box.replaceChildren(...lanes, legend);
}

// ---------------------------------------------------------------- mixer (Web Audio)

class Mixer {
  constructor(status) {
    this.songId = status.music_id;
    this.instruments = status.instruments;
    this.context = null;
    this.stems = [];            // {instrument, buffer, gain, muted, solo, volume, canvas}
    this.playing = false;
    this.offset = 0;            // seconds into the song when paused
    this.load();
  }

  async load() {
    const status = $("#mixer-status"), container = $("#mixer");
    status.textContent = "loading stems…";
    container.replaceChildren();
    this.context = new AudioContext();
    const rows = this.instruments.map((instrument) => this.row(instrument));
    container.append(...rows.map((r) => r.node));
    try {
      await Promise.all(rows.map(async (row) => {
        const response = await fetch(`${row.stem.instrument.track}?format=mp3`);
        if (!response.ok) throw new Error(`${row.stem.instrument.name}: ${response.status}`);
        row.stem.buffer = await this.context.decodeAudioData(await response.arrayBuffer());
        drawWaveform(row.stem.canvas, row.stem.buffer);
      }));
    } catch (error) {
      status.textContent = `could not load the stems: ${error.message}`;
      return;
    }
    this.duration = Math.max(...this.stems.map((s) => s.buffer.duration));
    status.textContent = "";
    $("#play").disabled = false;
    this.tick();
  }

  row(instrument) {
    const stem = { instrument, buffer: null, gain: null, muted: false, solo: false, volume: 1, source: null };
    stem.canvas = el("canvas", { class: "wave", width: 600, height: 48 });
    stem.canvas.addEventListener("click", (e) => {
      const fraction = e.offsetX / stem.canvas.clientWidth;
      this.seek(fraction * (this.duration || 0));
    });
    const mute = el("button", { class: "toggle", "data-role": "mute", "aria-pressed": "false",
      onclick: () => { stem.muted = !stem.muted; mute.setAttribute("aria-pressed", stem.muted); this.applyGains(); } },
      "Mute");
    const solo = el("button", { class: "toggle", "data-role": "solo", "aria-pressed": "false",
      onclick: () => { stem.solo = !stem.solo; solo.setAttribute("aria-pressed", stem.solo); this.applyGains(); } },
      "Solo");
    const volume = el("input", { type: "range", min: 0, max: 1.5, step: 0.01, value: 1, "aria-label": "volume",
      oninput: () => { stem.volume = Number(volume.value); this.applyGains(); } });
    const links = el("span", { class: "stem-links" },
      el("a", { href: `${instrument.track}?format=mp3&download=1` }, "MP3"), " ",
      el("a", { href: `${instrument.track}?format=wav&download=1` }, "WAV"));
    this.stems.push(stem);
    const node = el("div", { class: "stem", "data-stem": instrument.name },
      el("div", { class: "stem-name" }, instrument.name), mute, solo, volume, stem.canvas, links);
    return { node, stem };
  }

  audible(stem) {
    const anySolo = this.stems.some((s) => s.solo);
    return !stem.muted && (!anySolo || stem.solo);
  }

  applyGains() {
    for (const stem of this.stems) {
      stem.canvas.classList.toggle("silent", !this.audible(stem));
      if (stem.gain) stem.gain.gain.value = this.audible(stem) ? stem.volume : 0;
    }
  }

  position() {
    return this.playing ? this.context.currentTime - this.startedAt : this.offset;
  }

  play() {
    this.context.resume();
    const when = this.context.currentTime + 0.05;   // one start time for every stem keeps them in sync
    for (const stem of this.stems) {
      stem.source = this.context.createBufferSource();
      stem.source.buffer = stem.buffer;
      stem.gain = this.context.createGain();
      stem.source.connect(stem.gain).connect(this.context.destination);
      stem.source.start(when, this.offset);
    }
    this.startedAt = when - this.offset;
    this.playing = true;
    this.applyGains();
    $("#play").textContent = "Pause";
  }

  pause() {
    this.offset = Math.min(this.position(), this.duration);
    this.stop();
  }

  stop() {
    for (const stem of this.stems) { if (stem.source) { stem.source.stop(); stem.source = null; } }
    this.playing = false;
    $("#play").textContent = "Play";
  }

  seek(seconds) {
    const wasPlaying = this.playing;
    if (wasPlaying) this.stop();
    this.offset = Math.max(0, Math.min(seconds, this.duration));
    if (wasPlaying) this.play();
  }

  tick() {
    if (mixer !== this) return;
    const at = this.position();
    if (this.playing && at >= this.duration) { this.stop(); this.offset = 0; }
    $("#position").textContent = `${clock(at)} / ${clock(this.duration)}`;
    for (const stem of this.stems) drawPlayhead(stem.canvas, at / this.duration);
    requestAnimationFrame(() => this.tick());
  }

  async downloadMix() {
    const audible = this.stems.filter((s) => this.audible(s)).map((s) => s.instrument.track_id);
    const format = $("#mix-format").value;
    const status = $("#download-status");
    status.textContent = "mixing…";
    try {
      await api("POST", `/music/${this.songId}`, audible);   // the server mixes exactly these stems
      const names = this.stems.filter((s) => this.audible(s)).map((s) => s.instrument.name);
      status.textContent = `mix of ${names.join(", ") || "nothing (silence)"}`;
      const link = el("a", { href: `/music/${this.songId}/final?format=${format}&download=1` });
      document.body.append(link);
      link.click();
      link.remove();
    } catch (error) {
      status.textContent = `could not mix: ${error.message}`;
    }
  }
}

function drawWaveform(canvas, buffer) {
  const context = canvas.getContext("2d"), width = canvas.width, height = canvas.height;
  const data = buffer.getChannelData(0), step = Math.max(1, Math.floor(data.length / width));
  const peaks = [];
  for (let x = 0; x < width; x++) {
    let low = 1, high = -1;
    for (let i = x * step; i < Math.min(data.length, (x + 1) * step); i++) {
      if (data[i] < low) low = data[i];
      if (data[i] > high) high = data[i];
    }
    peaks.push([low, high]);
  }
  const scale = Math.max(1e-3, ...peaks.map(([l, h]) => Math.max(-l, h)));
  canvas.peaks = peaks.map(([l, h]) => [l / scale, h / scale]);
  drawPlayhead(canvas, 0);
}

function drawPlayhead(canvas, fraction) {
  if (!canvas.peaks) return;
  const context = canvas.getContext("2d"), width = canvas.width, height = canvas.height, mid = height / 2;
  context.clearRect(0, 0, width, height);
  canvas.peaks.forEach(([low, high], x) => {
    context.fillStyle = x / width < fraction ? "#2a7" : "#9ab";
    context.fillRect(x, mid - high * mid, 1, Math.max(1, (high - low) * mid));
  });
}

// ---------------------------------------------------------------- workers

function renderWorkers(workers) {
  $("#worker-count").textContent = workers.length;
  $("#workers-empty").hidden = workers.length > 0;
  $("#workers").replaceChildren(...workers.map((w) => el("tr", { class: w.state, "data-pid": w.pid },
    el("td", {}, w.worker), el("td", {}, w.host), el("td", {}, w.address), el("td", {}, w.pid),
    el("td", {}, el("span", { class: `state ${w.state}` }, w.state)),
    el("td", {}, w.job_id == null ? "–" : `#${w.job_id} (song ${w.music_id})`), el("td", {}, w.jobs_done),
    el("td", {}, w.mean_job_seconds == null ? "–" : `${w.mean_job_seconds.toFixed(1)}s`),
    el("td", {}, `${w.last_heartbeat_age.toFixed(1)}s ago`))));
}

// ---------------------------------------------------------------- live events

function connect() {
  const source = new EventSource("/events");
  const pill = $("#connection");
  source.onopen = () => { pill.textContent = "live"; pill.className = "pill ok"; };
  source.onerror = () => { pill.textContent = "reconnecting…"; pill.className = "pill warn"; };
  source.addEventListener("music", (event) => {
    const status = JSON.parse(event.data);
    renderSong(status);
    if (status.music_id === selectedId) refreshTimeline(selectedId);
  });
  source.addEventListener("workers", (event) => {
    renderWorkers(JSON.parse(event.data).workers);
    if (selectedId && songs.get(selectedId)?.state === "processing") {
      refreshTimeline(selectedId);
      updateTimes(songs.get(selectedId));
    }
  });
  source.addEventListener("reset", () => {
    songs.clear();
    selectedId = null;
    if (mixer) { mixer.stop(); mixer = null; }
    $("#song-panel").hidden = true;
    renderLibrary();
  });
}

async function start() {
  setUpDropzone();
  $("#start").addEventListener("click", startProcessing);
  $("#play").addEventListener("click", () => { if (!mixer) return; mixer.playing ? mixer.pause() : mixer.play(); });
  $("#download-mix").addEventListener("click", () => mixer && mixer.downloadMix());
  $("#reset").addEventListener("click", async () => {
    if (!confirm("Stop all work and delete every song and result?")) return;
    try { await api("POST", "/reset"); } catch (error) { alert(`Reset failed: ${error.message}`); }
  });
  for (const song of await api("GET", "/music")) songs.set(song.music_id, song);
  renderLibrary();
  renderWorkers(await api("GET", "/workers"));
  connect();
}

start();
