// The transcode form in people's words: a few ready-made choices, each the raw settings
// (codec, quality or bitrate, height) the "Advanced" part of the form shows and sends,
// and an estimate of the result's size from the source's bitrate and the chosen quality.
//   Web      H.264 at 720p (or the source's height when smaller): plays everywhere.
//   Small    AV1 at 360p (or the source's height when smaller): the smallest file.
//   Both at a bitrate derived from the source's (at most 90 % / 50 % of its video bitrate
//            scaled to the picture kept, and room for the audio within 85 % of its whole
//            bitrate), so the file is smaller than the source: a constant quality is not (a
//            360p source grew to 179 % at VP9's default CRF, 113 % at H.264's CRF 23). The
//            kind's audio is the source's, copied, or encoded at the source's bitrate or
//            128 kb/s, whichever is lower, so it never grows the file.
//   Archive  HEVC at the source's height, constant quality 24: keeps the quality (it may
//            be larger than a strongly compressed source; the estimate says so).
const AUDIO_BPS = 128_000;      // the most the kind's audio takes (src/kinds/transcode/stitch.py: copied, or at most 128k)
const SMALL_MAX_BPS = 600_000;  // a 360p AV1 needs no more for most material
const WEB_MAX_BPS = 2_500_000;  // nor a 720p H.264
const MIN_BPS = 16_000;         // the kind's lowest bitrate

// How many bits a codec spends for the same picture, relative to the source's (assumed
// H.264-like), at its reference CRF; 6 CRF steps halve or double it (x264's rule, close
// enough for the others at these ranges).
const CODEC = {
  h264: { factor: 1.0, crf: 23 }, hevc: { factor: 0.6, crf: 28 },
  vp9: { factor: 0.65, crf: 32 }, av1: { factor: 0.5, crf: 35 },
};

export const PRESETS = [
  { id: "web", label: "Web (H.264 720p)", hint: "plays in every browser and phone" },
  { id: "small", label: "Small (AV1 360p)", hint: "the smallest file; newer browsers play it" },
  { id: "archive", label: "Archive (HEVC)", hint: "keeps the quality and the picture's size" },
  { id: "custom", label: "Custom", hint: "your own settings, under Advanced" },
];

// The source's figures the estimate starts from.
export function sourceFacts(media) {
  const seconds = media?.duration || 0;
  const total = seconds > 0 ? (media.size * 8) / seconds : 0;
  const audio = media?.audio ? Math.min(AUDIO_BPS, total / 4) : 0;   // a guess: the probe has no audio bitrate
  // the result's audio is the source's (copied, or encoded at no more than its bitrate): `audio` both ways
  return { seconds, height: media?.video?.height ?? null, total, audio, video: Math.max(total - audio, total / 2) };
}

// The raw settings of a preset for this source (only the fields the form has).
export function presetValues(id, media) {
  const src = sourceFacts(media);
  const atMost = (height) => (src.height && src.height <= height ? "" : String(height));
  if (id === "archive") return { codec: "hevc", rate: "crf", crf: "24", bitrate: "", height: "" };
  if (id === "web") return capped("h264", 720, WEB_MAX_BPS, 0.9);
  if (id === "small") return capped("av1", 360, SMALL_MAX_BPS, 0.5);
  return null;

  // A bitrate for the picture kept: at most `share` of the source's video bits scaled to it,
  // and room for the kind's audio within 85 % of the source's whole bitrate, so the result is
  // smaller than the source; `max` scaled to the height is enough for most material.
  function capped(codec, height, max, share) {
    const kept = src.height ? Math.min(height, src.height) : height;
    const scale = src.height ? (kept / src.height) ** 2 : 1;
    const room = 0.85 * src.total - src.audio;
    const bps = Math.max(MIN_BPS, Math.min(max * (kept / height) ** 2, share * src.video * scale, room));
    return { codec, rate: "bitrate", crf: "", bitrate: `${Math.round(bps / 1000)}k`, height: atMost(height) };
  }
}

// Bytes the result will take, roughly: the video at the chosen bitrate (or the source's,
// scaled to the picture and the codec and the quality), plus the audio.
export function estimateBytes(values, media) {
  const src = sourceFacts(media);
  if (!src.seconds || !src.total) return null;
  const codec = CODEC[values.codec] ?? CODEC.h264;
  let video;
  if (values.rate === "bitrate" && values.bitrate) {
    const match = /^(\d+(?:\.\d+)?)([kKmM]?)$/.exec(values.bitrate.trim());
    if (!match) return null;
    video = Number(match[1]) * ({ k: 1e3, m: 1e6 }[match[2].toLowerCase()] ?? 1);
  } else {
    const crf = values.crf === "" || values.crf == null ? codec.crf : Number(values.crf);
    const height = Number(values.height) || src.height || 1;
    const scale = src.height ? (height / src.height) ** 2 : 1;
    video = src.video * scale * codec.factor * 2 ** ((codec.crf - crf) / 6);
  }
  return ((video + src.audio) * src.seconds) / 8;
}
