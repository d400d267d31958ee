// The practice player of a finished song: every stem, and the original upload, streams
// from the server into its own <audio> element (`/music/{id}/stream/{name}`: a WAV made on
// the fly, with Range), so a long song plays within a second and the page never holds
// decoded audio (the old Web Audio mixer decoded whole stems: 638 MB of heap for 15 min).
// All elements play together; muting only silences one, so they stay in step, and any
// that drifts is put back. Tempo is the browser's own time-stretch (`playbackRate` with
// `preservesPitch`); a key shift streams a rubberband rendering from the server. The mix
// opens as the song was processed: exactly the chosen instruments audible.
import { $, el, clock, download } from "./dom.js";

const DRIFT_SECONDS = 0.06;   // more than this apart from the first stem: put back in step
const SEEK_STEP = 5;

export class Player {
  constructor(status) {
    this.songId = status.music_id;
    this.name = status.name;
    this.duration = status.duration;
    this.offset = 0;
    this.playing = false;
    this.comparing = false;       // hearing the original instead of the mix
    this.tempo = 1;
    this.semitones = 0;
    this.loop = { a: null, b: null, on: false };
    this.alive = true;
    const chosen = new Set(status.mix_selection ?? status.selection ?? status.instruments.map((i) => i.track_id));
    this.stems = status.instruments.map((i) => this.stem(i.name, i.track_id, !chosen.has(i.track_id)));
    this.original = this.stem("original", null, false);
    this.all = [...this.stems, this.original];
    $("#mixer").replaceChildren(...this.stems.map((s) => this.row(s)), this.originalRow());
    this.apply();
    this.load();
  }

  stem(name, trackId, muted) {
    const audio = new Audio();
    audio.preload = "auto";
    audio.preservesPitch = true;
    audio.src = this.streamUrl(name, 0);
    return { name, trackId, muted, solo: false, volume: 1, audio, canvas: null, buttons: {} };
  }

  streamUrl(name, semitones) {
    const key = semitones ? `?semitones=${semitones}` : "";
    return `/music/${this.songId}/stream/${encodeURIComponent(name)}${key}`;
  }

  async load() {
    this.status("loading…");
    try {
      await Promise.all(this.all.map((s) => ready(s.audio)));
    } catch (error) {
      this.status(`could not load the stems: ${error.message}`);
      return;
    }
    if (!this.alive) return;
    this.status("");
    $("#play").disabled = false;
    this.drawRuler();
    this.tick();
    fetch(`/music/${this.songId}/peaks`).then((r) => r.json()).then((data) => {
      for (const stem of this.all) drawWaveform(stem.canvas, data.peaks?.[stem.name]);
    }).catch(() => { /* no waveforms: the player works without them */ });
  }

  // ------------------------------------------------------------ rows

  row(stem) {
    const toggle = (role, label) => el("button", {
      class: "toggle", "data-role": role, "aria-pressed": "false", "aria-label": `${label} ${stem.name}`,
      onclick: () => (role === "mute" ? this.toggleMute(stem) : this.toggleSolo(stem)) }, label);
    stem.buttons.mute = toggle("mute", "Mute");
    stem.buttons.solo = toggle("solo", "Solo");
    const volume = el("input", { type: "range", min: 0, max: 1, step: 0.05, value: 1,
      "aria-label": `Volume of ${stem.name}`, oninput: () => { stem.volume = Number(volume.value); this.apply(); } });
    stem.canvas = this.canvas(stem);
    return el("div", { class: "stem", "data-stem": stem.name, tabindex: 0, "aria-label": `${stem.name} stem` },
      el("span", { class: "stem-name" }, stem.name),
      el("span", { class: "stem-buttons" }, stem.buttons.mute, stem.buttons.solo, volume),
      stem.canvas, this.links(`/music/${this.songId}/tracks/${stem.trackId}`, stem.name));
  }

  originalRow() {
    this.original.canvas = this.canvas(this.original);
    return el("div", { class: "stem original", "data-stem": "original" },
      el("span", { class: "stem-name" }, "original"),
      el("span", { class: "stem-buttons muted small" }, "the upload, to compare (O)"),
      this.original.canvas, this.links(`/music/${this.songId}/original`, "original"));
  }

  canvas(stem) {
    const canvas = el("canvas", { class: "wave", width: 800, height: 48, role: "img",
                                  "aria-label": `waveform of ${stem.name}; click to jump there` });
    canvas.addEventListener("click", (e) => this.seek(this.duration * e.offsetX / canvas.clientWidth));
    return canvas;
  }

  links(base, name) {
    return el("span", { class: "stem-links" }, ["mp3", "wav", "flac"].map((fmt) =>
      el("a", { href: `${base}?format=${fmt}&download=1`, "aria-label": `Download ${name} as ${fmt.toUpperCase()}` },
         fmt.toUpperCase())));
  }

  // ------------------------------------------------------------ what is heard

  audible(stem) {
    if (stem === this.original) return this.comparing;
    if (this.comparing) return false;
    const anySolo = this.stems.some((s) => s.solo);
    return !stem.muted && (!anySolo || stem.solo);
  }

  apply() {
    for (const stem of this.all) {
      stem.audio.muted = !this.audible(stem);
      stem.audio.volume = stem.volume;
      stem.canvas?.classList.toggle("silent", !this.audible(stem));
      stem.buttons.mute?.setAttribute("aria-pressed", stem.muted);
      stem.buttons.solo?.setAttribute("aria-pressed", stem.solo);
    }
    $("#compare").setAttribute("aria-pressed", this.comparing);
    const heard = this.heard();
    $("#download-mix").disabled = this.comparing || heard.length === 0;
    $("#download-status").textContent = this.comparing ? "hearing the original; the mix download is the stems"
      : heard.length ? `the download holds what you hear: ${heard.map((s) => s.name).join("+")}`
      : "nothing is audible";
  }

  heard() { return this.stems.filter((s) => this.audible(s)); }

  toggleMute(stem) { stem.muted = !stem.muted; this.apply(); }
  toggleSolo(stem) { stem.solo = !stem.solo; this.apply(); }
  toggleCompare() { this.comparing = !this.comparing; this.apply(); }

  // ------------------------------------------------------------ transport

  position() { return this.playing ? this.stems[0].audio.currentTime : this.offset; }

  async play() {
    const at = this.offset >= this.duration - 0.05 ? 0 : this.offset;
    for (const stem of this.all) stem.audio.currentTime = at;
    this.playing = true;
    $("#play").textContent = "Pause";
    await Promise.all(this.all.map((s) => s.audio.play().catch(() => {})));
  }

  pause() {
    this.offset = this.position();
    this.playing = false;
    for (const stem of this.all) stem.audio.pause();
    $("#play").textContent = "Play";
  }

  toggle() { if (this.playing) this.pause(); else this.play(); }

  seek(seconds) {
    this.offset = Math.max(0, Math.min(seconds, this.duration));
    for (const stem of this.all) stem.audio.currentTime = this.offset;
  }

  seekBy(seconds) { this.seek(this.position() + seconds); }

  setTempo(tempo) {
    this.tempo = tempo;
    for (const stem of this.all) {
      stem.audio.defaultPlaybackRate = tempo;
      stem.audio.playbackRate = tempo;
    }
    $("#tempo-value").textContent = `${tempo}x`;
  }

  async setKey(semitones) {
    this.semitones = semitones;
    $("#key-value").textContent = semitones ? `${semitones > 0 ? "+" : ""}${semitones}` : "±0";
    this.status(semitones ? `rendering the key ${$("#key-value").textContent}…` : "");
    // the new rendering loads in fresh elements while the old ones play on; then they swap
    const fresh = this.all.map((stem) => {
      const audio = new Audio(this.streamUrl(stem.name, semitones));
      audio.preload = "auto";
      return audio;
    });
    try {
      await Promise.all(fresh.map(ready));
    } catch (error) {
      this.status(`could not change the key: ${error.message}`);
      return;
    }
    if (!this.alive || this.semitones !== semitones) return;   // a later change won
    const wasPlaying = this.playing, at = this.position();
    if (wasPlaying) this.pause();
    this.all.forEach((stem, i) => { stem.audio.src = ""; stem.audio = fresh[i]; });
    this.setTempo(this.tempo);
    this.apply();
    this.seek(at);
    if (wasPlaying) await this.play();
    this.status("");
  }

  setLoopPoint(which) {
    const at = Math.round(this.position() * 10) / 10;
    this.loop[which] = at;
    const { a, b } = this.loop;
    if (a !== null && b !== null && b < a) [this.loop.a, this.loop.b] = [b, a];
    if (a !== null && b !== null) this.loop.on = true;
    this.drawLoop();
  }

  toggleLoop() {
    this.loop.on = !this.loop.on && this.loop.a !== null && this.loop.b !== null;
    this.drawLoop();
  }

  drawLoop() {
    const { a, b, on } = this.loop;
    $("#loop").setAttribute("aria-pressed", on);
    $("#loop-text").textContent = a === null && b === null ? "no loop points"
      : `A ${a === null ? "–" : clock(a)} · B ${b === null ? "–" : clock(b)}`;
    const region = $("#loop-region");
    region.hidden = !(on && a !== null && b !== null);
    if (!region.hidden) {
      region.style.left = `${100 * a / this.duration}%`;
      region.style.width = `${100 * (b - a) / this.duration}%`;
    }
  }

  drawRuler() {
    const seek = $("#seek");
    seek.max = this.duration;
    const step = [1, 2, 5, 10, 15, 30, 60, 120, 300].find((s) => this.duration / s <= 8) ?? 600;
    const marks = [];
    for (let t = 0; t <= this.duration + 1e-6; t += step) {
      const mark = el("span", { class: "mark" }, clock(t));
      mark.style.left = `${100 * t / this.duration}%`;
      marks.push(mark);
    }
    $("#ruler").replaceChildren(...marks);
    this.drawLoop();
  }

  tick() {
    if (!this.alive) return;
    let at = this.position();
    const { a, b, on } = this.loop;
    if (this.playing && on && at >= b) { this.seek(a); at = a; }
    if (this.playing && this.stems[0].audio.ended) { this.pause(); this.offset = 0; at = 0; }
    if (this.playing) {   // keep every element on the first one's clock
      for (const stem of this.all.slice(1)) {
        if (Math.abs(stem.audio.currentTime - at) > DRIFT_SECONDS) stem.audio.currentTime = at;
      }
    }
    $("#position").textContent = `${clock(at)} / ${clock(this.duration)}`;
    const seek = $("#seek");
    if (document.activeElement !== seek) seek.value = at;
    for (const stem of this.all) drawPlayhead(stem.canvas, at / this.duration);
    requestAnimationFrame(() => this.tick());
  }

  status(text) { $("#player-status").textContent = text; }

  // ------------------------------------------------------------ download what you hear

  downloadMix() {
    const heard = this.heard();
    if (!heard.length) return;
    const params = new URLSearchParams({
      tracks: heard.map((s) => s.trackId).join(","),
      gain: heard.map((s) => s.volume).join(","),
      format: $("#mix-format").value,
    });
    if (this.tempo !== 1) params.set("tempo", this.tempo);
    if (this.semitones) params.set("semitones", this.semitones);
    const applied = [heard.some((s) => s.volume !== 1) && "volumes",
                     this.tempo !== 1 && `tempo ${this.tempo}x`, this.semitones && `key ${$("#key-value").textContent}`];
    $("#download-status").textContent = `downloading ${heard.map((s) => s.name).join("+")}` +
      (applied.some(Boolean) ? ` with ${applied.filter(Boolean).join(", ")} applied` : "") + "…";
    download(`/music/${this.songId}/mix?${params}`);
  }

  close() {
    this.alive = false;
    for (const stem of this.all) { stem.audio.pause(); stem.audio.src = ""; }
  }
}

// Resolves once an element can play (its metadata and some audio are in).
function ready(audio) {
  return new Promise((resolve, reject) => {
    if (audio.readyState >= HTMLMediaElement.HAVE_FUTURE_DATA) { resolve(); return; }
    audio.addEventListener("canplay", resolve, { once: true });
    audio.addEventListener("error", () => reject(new Error(audio.error?.message || "the stream failed")),
                           { once: true });
  });
}

function drawWaveform(canvas, peaks) {
  if (!canvas || !peaks) return;
  canvas.peaks = peaks;
  canvas.drawnAt = null;
  drawPlayhead(canvas, 0);
}

function drawPlayhead(canvas, fraction) {
  if (!canvas?.peaks) return;
  const width = canvas.width, mid = canvas.height / 2, x0 = Math.round(fraction * width);
  if (canvas.drawnAt === x0) return;   // nothing moved by a pixel
  canvas.drawnAt = x0;
  const context = canvas.getContext("2d"), step = width / canvas.peaks.length;
  context.clearRect(0, 0, width, canvas.height);
  canvas.peaks.forEach(([low, high], i) => {
    context.fillStyle = i * step < x0 ? "#11694c" : "#8a97a8";
    context.fillRect(i * step, mid - high * mid, Math.max(1, step), Math.max(1, (high - low) * mid));
  });
}

export { SEEK_STEP };
