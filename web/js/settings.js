// A song's practice settings (tempo, key, each stem's volume, mute and solo, the loop
// points) kept per song in localStorage, and in the URL fragment so a link carries them:
//   #song=3&tempo=0.8&key=-2&a=5.3&b=8.3&loop=1&vol=drums:0.5&mute=vocals&solo=bass
// A fragment that names the song and holds settings wins over what this browser kept.
const KEY = (songId) => `karaoke.song.${songId}`;
const FIELDS = ["tempo", "key", "a", "b", "loop", "vol", "mute", "solo"];

export function restore(songId) {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (Number(hash.get("song")) === songId && FIELDS.some((f) => hash.has(f))) return fromParams(hash);
  try {
    const kept = JSON.parse(localStorage.getItem(KEY(songId)) ?? "null");
    return kept && typeof kept === "object" ? kept : null;
  } catch (_) {
    return null;   // storage refused (private mode) or garbled: the defaults
  }
}

export function keep(songId, settings) {
  try { localStorage.setItem(KEY(songId), JSON.stringify(settings)); } catch (_) { /* storage full or refused */ }
  if (Number(new URLSearchParams(location.hash.slice(1)).get("song")) === songId) {
    history.replaceState(null, "", `#${toParams(songId, settings)}`);
  }
}

function toParams(songId, s) {
  const p = new URLSearchParams({ song: songId });
  if (s.tempo !== 1) p.set("tempo", s.tempo);
  if (s.key) p.set("key", s.key);
  if (s.loop.a !== null) p.set("a", s.loop.a);
  if (s.loop.b !== null) p.set("b", s.loop.b);
  if (s.loop.on) p.set("loop", 1);
  const stems = Object.entries(s.stems);
  const vol = stems.filter(([, v]) => v.volume !== 1).map(([n, v]) => `${n}:${v.volume}`);
  if (vol.length) p.set("vol", vol.join(","));
  p.set("mute", stems.filter(([, v]) => v.muted).map(([n]) => n).join(","));
  const solo = stems.filter(([, v]) => v.solo).map(([n]) => n);
  if (solo.length) p.set("solo", solo.join(","));
  return p.toString();
}

function fromParams(p) {
  const number = (name, fallback) => (p.has(name) && Number.isFinite(Number(p.get(name))) ? Number(p.get(name)) : fallback);
  const list = (name) => (p.get(name) ?? "").split(",").filter(Boolean);
  const stems = {};
  const stem = (name) => (stems[name] ??= { volume: 1, muted: false, solo: false });
  for (const pair of list("vol")) {
    const [name, value] = pair.split(":");
    if (Number.isFinite(Number(value))) stem(name).volume = Number(value);
  }
  for (const name of list("mute")) stem(name).muted = true;
  for (const name of list("solo")) stem(name).solo = true;
  return { tempo: number("tempo", 1), key: number("key", 0), stems, mutesGiven: p.has("mute"),
           loop: { a: number("a", null), b: number("b", null), on: p.get("loop") === "1" } };
}
