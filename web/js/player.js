// The practice player of a finished song: every stem, and the original upload, streams
// from the server into its own <audio> element (`/music/{id}/stream/{name}`: a WAV made on
// the fly, with Range), so a long song plays within a second and the page never holds
// decoded audio. All elements play together and stay in step (any that drifts is put
// back); each feeds a gain of its own (mute, solo, volume) into one Web Audio graph.
// Tempo is the browser's own time-stretch (`playbackRate` with `preservesPitch`); the key
// is shifted as it plays by SoundTouch in an AudioWorklet (web/vendor/soundtouchjs), so a
// key change is heard at once and the server renders a key only for a download.
// The mix opens as the song was processed (exactly the chosen instruments audible), or
// with the settings kept for this song (js/settings.js).
import { $, el, clock, clockTenths } from "./dom.js";
import { SoundTouchNode } from "../vendor/soundtouchjs/SoundTouchNode.js";
import * as settings from "./settings.js";

const DRIFT_SECONDS = 0.06;   // more than this apart from the first stem: put back in step
const SEEK_STEP = 5;
const MIN_LOOP = 0.1;         // seconds between A and B at least
const GRAB_PX = 8;            // how near a loop line a pointer grabs it
const PROCESSOR = "/web/vendor/soundtouchjs/soundtouch-processor.js";
const STRETCH_SEQUENCE_MS = 40;
const STRETCH_SEEK_MS = 12;

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
    this.context = new AudioContext({ latencyHint: "interactive" });
    this.output = this.context.createGain();   // every stem's gain meets here, then the key shift
    const chosen = new Set(status.mix_selection ?? status.selection ?? status.instruments.map((i) => i.track_id));
    this.stems = status.instruments.map((i) => this.stem(i.name, i.track_id, !chosen.has(i.track_id)));
    this.original = this.stem("original", null, false);
    this.all = [...this.stems, this.original];
    $("#mixer").replaceChildren(...this.stems.map((s) => this.row(s)), this.originalRow());
    $("#downloads-list").replaceChildren(
      ...this.stems.map((s) => this.links(`/music/${this.songId}/tracks/${s.trackId}`, s.name)),
      this.links(`/music/${this.songId}/original`, "original"));
    $("#loop-message").textContent = "";
    $("#play").disabled = true;   // until this song's streams can play
    $("#play").textContent = "Play";
    this.restore(settings.restore(this.songId));
    this.load();
  }

  stem(name, trackId, muted) {
    const audio = new Audio();
    audio.preload = "auto";
    audio.preservesPitch = true;
    audio.src = `/music/${this.songId}/stream/${encodeURIComponent(name)}`;
    const gain = this.context.createGain();
    this.context.createMediaElementSource(audio).connect(gain).connect(this.output);
    return { name, trackId, muted, solo: false, volume: 1, audio, gain, canvas: null, buttons: {}, slider: null };
  }

  async load() {
    this.status("loading…");
    try {
      await Promise.all([this.connectShifter(), ...this.all.map((s) => ready(s.audio))]);
    } catch (error) {
      this.status(`could not load the stems: ${error.message}`);
      return;
    }
    if (!this.alive) return;
    this.status("");
    $("#play").disabled = false;
    this.onReady?.();
    this.drawRuler();
    this.tick();
    fetch(`/music/${this.songId}/peaks`).then((r) => r.json()).then((data) => {
      for (const stem of this.all) drawWaveform(stem.canvas, data.peaks?.[stem.name]);
    }).catch(() => { /* no waveforms: the player works without them */ });
  }

  // The key shift: one SoundTouch node after the sum of the stems. Without AudioWorklet
  // (an old browser) the mix plays unshifted and the key slider says so.
  async connectShifter() {
    try {
      await SoundTouchNode.register(this.context, PROCESSOR);
      this.shifter = new SoundTouchNode({ context: this.context });
      // shorter windows than SoundTouch's automatic 50-125 ms: a key change is heard sooner,
      // and for a shift of a few semitones at tempo 1 they sound the same
      this.shifter.setStretchParameters({ sequenceMs: STRETCH_SEQUENCE_MS, seekWindowMs: STRETCH_SEEK_MS });
      this.output.connect(this.shifter).connect(this.context.destination);
      this.setKey(this.semitones);
    } catch (error) {
      this.shifter = null;
      this.output.connect(this.context.destination);
      $("#key").disabled = true;
      $("#key-value").textContent = "key changes need a newer browser";
    }
  }

  // ------------------------------------------------------------ rows

  row(stem) {
    const toggle = (role, label) => el("button", {
      class: "toggle", "data-role": role, "aria-pressed": "false", "aria-label": `${label} ${stem.name}`,
      onclick: () => (role === "mute" ? this.toggleMute(stem) : this.toggleSolo(stem)) }, label);
    stem.buttons.mute = toggle("mute", "Mute");
    stem.buttons.solo = toggle("solo", "Solo");
    stem.slider = el("input", { type: "range", min: 0, max: 1, step: 0.05, value: stem.volume,
      "aria-label": `Volume of ${stem.name}`,
      oninput: () => { stem.volume = Number(stem.slider.value); this.apply(); } });
    stem.canvas = this.canvas(stem);
    return el("div", { class: "stem", "data-stem": stem.name, tabindex: 0, "aria-label": `${stem.name} stem` },
      el("span", { class: "stem-name" }, stem.name),
      el("span", { class: "stem-buttons" }, stem.buttons.mute, stem.buttons.solo, stem.slider),
      stem.canvas);
  }

  originalRow() {
    this.original.canvas = this.canvas(this.original);
    return el("div", { class: "stem original", "data-stem": "original" },
      el("span", { class: "stem-name" }, "original"),
      el("span", { class: "stem-buttons muted small" }, "the upload, to compare (O)"),
      this.original.canvas);
  }

  // A waveform: a click seeks there; the loop's A and B lines on it can be dragged.
  canvas(stem) {
    const canvas = el("canvas", { class: "wave", width: 800, height: 48, role: "img",
                                  "aria-label": `waveform of ${stem.name}; click to jump there` });
    canvas.secondsWide = this.duration;
    const timeAt = (e) => this.duration * Math.min(1, Math.max(0, e.offsetX / canvas.clientWidth));
    const near = (e) => ["a", "b"].find((p) => this.loop[p] !== null &&
      Math.abs(e.offsetX - canvas.clientWidth * this.loop[p] / this.duration) <= GRAB_PX);
    canvas.addEventListener("pointerdown", (e) => {
      const point = near(e);
      if (!point) { this.seek(timeAt(e)); return; }
      canvas.setPointerCapture(e.pointerId);
      canvas.dragging = point;
    });
    canvas.addEventListener("pointermove", (e) => {
      if (canvas.dragging) this.moveLoopPoint(canvas.dragging, timeAt(e));
      else canvas.classList.toggle("grab", Boolean(near(e)));
    });
    const drop = () => { if (canvas.dragging) { canvas.dragging = null; this.changed(); } };
    canvas.addEventListener("pointerup", drop);
    canvas.addEventListener("pointercancel", drop);
    return canvas;
  }

  links(base, name) {
    return el("li", {}, el("span", { class: "stem-name" }, name), ["mp3", "wav", "flac"].map((fmt) =>
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
      stem.gain.gain.value = this.audible(stem) ? stem.volume : 0;
      stem.canvas?.classList.toggle("silent", !this.audible(stem));
      stem.buttons.mute?.setAttribute("aria-pressed", stem.muted);
      stem.buttons.solo?.setAttribute("aria-pressed", stem.solo);
      if (stem.slider) stem.slider.value = stem.volume;
    }
    $("#compare").setAttribute("aria-pressed", this.comparing);
    const heard = this.heard();
    $("#download-mix").disabled = this.comparing || heard.length === 0 || this.downloading;
    if (!this.downloading) {
      $("#download-status").textContent = this.comparing ? "hearing the original; the mix download is the stems"
        : heard.length ? `holds what you hear: ${heard.map((s) => s.name).join("+")}` : "nothing is audible";
    }
    this.changed();
  }

  heard() { return this.stems.filter((s) => this.audible(s)); }

  toggleMute(stem) { stem.muted = !stem.muted; this.apply(); }
  toggleSolo(stem) { stem.solo = !stem.solo; this.apply(); }
  toggleCompare() { this.comparing = !this.comparing; this.apply(); }

  // ------------------------------------------------------------ settings kept per song

  restore(saved) {
    if (saved) {
      for (const stem of this.stems) {
        const kept = saved.stems?.[stem.name];
        if (kept) Object.assign(stem, { volume: clamp(Number(kept.volume ?? 1), 0, 1), muted: Boolean(kept.muted),
                                        solo: Boolean(kept.solo) });
        else if (saved.mutesGiven) stem.muted = false;
      }
      const { a, b, on } = saved.loop ?? {};
      if (Number.isFinite(a) && a >= 0 && a < this.duration) this.loop.a = a;
      if (this.loop.a !== null && Number.isFinite(b) && b > this.loop.a && b <= this.duration) this.loop.b = b;
      this.loop.on = Boolean(on) && this.loop.b !== null;
    }
    this.restoring = true;   // nothing is written back while the settings are being put in place
    this.setTempo(clamp(Number(saved?.tempo ?? 1), 0.5, 1.25));
    this.setKey(Math.round(clamp(Number(saved?.key ?? 0), -12, 12)));
    this.apply();
    this.drawLoop();
    this.restoring = false;
    this.changed();
  }

  changed() {
    if (this.restoring || !this.alive) return;
    clearTimeout(this.keepTimer);
    this.keepTimer = setTimeout(() => settings.keep(this.songId, {
      tempo: this.tempo, key: this.semitones, loop: { ...this.loop },
      stems: Object.fromEntries(this.stems.map((s) => [s.name, { volume: s.volume, muted: s.muted, solo: s.solo }])),
    }), 200);
  }

  // ------------------------------------------------------------ transport

  position() { return this.playing ? this.stems[0].audio.currentTime : this.offset; }

  async play() {
    const at = this.offset >= this.duration - 0.05 ? 0 : this.offset;
    for (const stem of this.all) stem.audio.currentTime = at;
    this.playing = true;
    $("#play").textContent = "Pause";
    await this.context.resume();
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
    $("#tempo").value = tempo;
    $("#tempo-value").textContent = `${tempo}x`;
    this.changed();
  }

  // Heard as soon as the worklet's next render quantum: nothing is fetched or rendered.
  setKey(semitones) {
    this.semitones = semitones;
    $("#key").value = semitones;
    $("#key-value").textContent = keyName(semitones);
    this.shifter?.pitchSemitones.setValueAtTime(semitones, this.context.currentTime);
    this.changed();
  }

  // ------------------------------------------------------------ the A-B loop
  // [ sets A at the playhead and clears B; ] sets B after A (or is refused, saying why);
  // the loop is on only while both are set.

  setLoopA() {
    this.loop = { a: tenths(this.position()), b: null, on: false };
    this.loopMessage(`A at ${clockTenths(this.loop.a)}: now set B at the end of the passage`);
  }

  setLoopB() {
    const at = tenths(this.position()), { a } = this.loop;
    if (a === null) return this.loopMessage("Set A first: B is the end of the loop");
    if (at < a + MIN_LOOP) {
      return this.loopMessage(`B must come after A (${clockTenths(a)}): play on or move there, then set B`);
    }
    this.loop = { a, b: at, on: true };
    this.loopMessage("");
    return true;
  }

  toggleLoop() {
    if (this.loop.a === null || this.loop.b === null) return this.loopMessage("Set A and B first");
    this.loop.on = !this.loop.on;
    this.loopMessage("");
    return true;
  }

  clearLoop() {
    this.loop = { a: null, b: null, on: false };
    this.loopMessage("");
  }

  // A dragged loop line: A stays before B and B after A.
  moveLoopPoint(point, seconds) {
    const { a, b } = this.loop;
    const at = tenths(seconds);
    if (point === "a") this.loop.a = clamp(at, 0, b === null ? this.duration : b - MIN_LOOP);
    else this.loop.b = clamp(at, a + MIN_LOOP, this.duration);
    this.drawLoop(true);
  }

  loopMessage(text) {
    $("#loop-message").textContent = text;
    this.drawLoop();
    return false;
  }

  drawLoop(dragging = false) {
    const { a, b, on } = this.loop;
    const loopButton = $("#loop");
    loopButton.setAttribute("aria-pressed", on);
    loopButton.disabled = a === null || b === null;
    $("#loop-clear").disabled = a === null;
    $("#loop-text").textContent = a === null ? "no loop"
      : `A ${clockTenths(a)} · B ${b === null ? "not set" : clockTenths(b)}${b !== null && !on ? " (off)" : ""}`;
    const region = $("#loop-region");
    region.hidden = a === null || b === null;
    region.classList.toggle("off", !on);
    if (!region.hidden) {
      region.style.left = `${100 * a / this.duration}%`;
      region.style.width = `${100 * (b - a) / this.duration}%`;
    }
    for (const stem of this.all) {
      if (stem.canvas) { stem.canvas.loop = this.loop; stem.canvas.drawnAt = null; }
    }
    if (!dragging) this.changed();
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
    const text = `${clock(at)} of ${clock(this.duration)}`;
    if (text !== this.shownText) {
      this.shownText = text;
      $("#position").textContent = `${clock(at)} / ${clock(this.duration)}`;
      $("#seek").setAttribute("aria-valuetext", text);
    }
    const seek = $("#seek");
    if (document.activeElement !== seek || this.playing) seek.value = at;
    for (const stem of this.all) drawPlayhead(stem.canvas, at / this.duration);
    requestAnimationFrame(() => this.tick());
  }

  status(text) { $("#player-status").textContent = text; }

  // ------------------------------------------------------------ download what you hear
  // The server renders the audible stems once, at the tempo and key set now; the page
  // fetches it (saying so while it is made) and saves it under the server's file name.

  async downloadMix() {
    const heard = this.heard();
    if (!heard.length || this.downloading) return;
    const params = new URLSearchParams({
      tracks: heard.map((s) => s.trackId).join(","),
      gain: heard.map((s) => s.volume).join(","),
      format: $("#mix-format").value,
    });
    if (this.tempo !== 1) params.set("tempo", this.tempo);
    if (this.semitones) params.set("semitones", this.semitones);
    const applied = [heard.some((s) => s.volume !== 1) && "volumes",
                     this.tempo !== 1 && `tempo ${this.tempo}x`, this.semitones && `key ${keyName(this.semitones)}`];
    const status = $("#download-status");
    status.textContent = `preparing ${heard.map((s) => s.name).join("+")}` +
      (applied.some(Boolean) ? ` with ${applied.filter(Boolean).join(", ")}` : "") + "…";
    this.downloading = true;
    $("#download-mix").disabled = true;
    try {
      const answer = await fetch(`/music/${this.songId}/mix?${params}&download=1`);
      if (!answer.ok) throw new Error((await answer.json().catch(() => ({}))).error ?? answer.statusText);
      const name = fileName(answer.headers.get("Content-Disposition")) ?? `mix.${params.get("format")}`;
      const url = URL.createObjectURL(await answer.blob());
      const link = el("a", { href: url, download: name });
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
      this.downloading = false;
      this.apply();
      status.textContent = `saved “${name}”`;
    } catch (error) {
      this.downloading = false;
      this.apply();
      status.textContent = `the download failed: ${error.message}`;
    }
  }

  close() {
    this.alive = false;
    clearTimeout(this.keepTimer);
    for (const stem of this.all) { stem.audio.pause(); stem.audio.src = ""; }
    this.context.close();
  }
}

const clamp = (value, low, high) => Math.min(high, Math.max(low, Number.isFinite(value) ? value : low));
const tenths = (seconds) => Math.round(seconds * 10) / 10;
const keyName = (semitones) => (semitones ? `${semitones > 0 ? "+" : ""}${semitones}` : "±0");

function fileName(disposition) {
  if (!disposition) return null;
  const star = /filename\*=UTF-8''([^;]+)/i.exec(disposition);
  if (star) return decodeURIComponent(star[1]);
  return /filename="?([^";]+)"?/i.exec(disposition)?.[1] ?? null;
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
  const width = canvas.width, height = canvas.height, mid = height / 2, x0 = Math.round(fraction * width);
  if (canvas.drawnAt === x0) return;   // nothing moved by a pixel
  canvas.drawnAt = x0;
  const context = canvas.getContext("2d"), step = width / canvas.peaks.length;
  context.clearRect(0, 0, width, height);
  const loop = canvas.loop;
  if (loop && loop.a !== null) {
    const xa = width * loop.a / canvas.secondsWide, xb = loop.b === null ? null : width * loop.b / canvas.secondsWide;
    if (xb !== null) {
      context.fillStyle = loop.on ? "#f4dca4" : "#eee6d2";
      context.fillRect(xa, 0, xb - xa, height);
    }
    context.fillStyle = "#8a5a00";
    context.fillRect(xa - 1, 0, 2, height);
    if (xb !== null) context.fillRect(xb - 1, 0, 2, height);
  }
  canvas.peaks.forEach(([low, high], i) => {
    context.fillStyle = i * step < x0 ? "#11694c" : "#8a97a8";
    context.fillRect(i * step, mid - high * mid, Math.max(1, step), Math.max(1, (high - low) * mid));
  });
}

export { SEEK_STEP };
