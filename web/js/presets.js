// The transcode form in people's words: a few ready-made choices, each the raw settings
// (codec, quality or bitrate, height) the "Advanced" part of the form shows and sends,
// and an estimate of the result's size from the source's bitrate and the chosen quality.
//   Web      H.264 at 720p (or the source's height when smaller), constant quality 23:
//            plays everywhere.
//   Small    AV1 at 360p (or the source's height when smaller) at a bitrate derived from the
//            source's: at most half the source's video bitrate scaled to the smaller picture,
//            and room left for the audio within 85 % of the source's bitrate, so the file is
//            smaller than the source (CRF alone is not: a source that is already small grew to
//            107 % at VP9's default CRF). Only a source under ~170 kb/s with sound cannot be
//            made smaller (the audio alone is 128 kb/s): the estimate says so.
//   Archive  HEVC at the source's height, constant quality 22: near the source's quality in
//            less space than H.264 would take.
const AUDIO_BPS = 128_000;      // the kind's audio (src/kinds/transcode/stitch.py: AAC or Opus at 128k)
const SMALL_MAX_BPS = 600_000;  // a 360p AV1 needs no more for most material
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
  { id: "archive", label: "Archive (HEVC)", hint: "keeps the quality and the size of the picture" },
  { id: "custom", label: "Custom", hint: "your own settings, under Advanced" },
];

// The source's figures the estimate starts from.
export function sourceFacts(media) {
  const seconds = media?.duration || 0;
  const total = seconds > 0 ? (media.size * 8) / seconds : 0;
  const audio = media?.audio ? Math.min(AUDIO_BPS, total / 4) : 0;   // a guess: the probe has no audio bitrate
  return { seconds, height: media?.video?.height ?? null, total, video: Math.max(total - audio, total / 2) };
}

// The raw settings of a preset for this source (only the fields the form has).
export function presetValues(id, media) {
  const src = sourceFacts(media);
  const atMost = (height) => (src.height && src.height <= height ? "" : String(height));
  if (id === "web") return { codec: "h264", rate: "crf", crf: "23", bitrate: "", height: atMost(720) };
  if (id === "archive") return { codec: "hevc", rate: "crf", crf: "22", bitrate: "", height: "" };
  if (id === "small") {
    const height = src.height ? Math.min(360, src.height) : 360;
    const scale = src.height ? (height / src.height) ** 2 : 1;
    // half the source's video bits for the picture kept, and room for the kind's audio within
    // 85 % of the source's whole bitrate
    const room = 0.85 * src.total - (media?.audio ? AUDIO_BPS : 0);
    const bps = Math.max(MIN_BPS, Math.min(SMALL_MAX_BPS, 0.5 * src.video * scale, room));
    return { codec: "av1", rate: "bitrate", crf: "", bitrate: `${Math.round(bps / 1000)}k`, height: atMost(360) };
  }
  return null;
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
  const audio = media?.audio ? AUDIO_BPS : 0;
  return ((video + audio) * src.seconds) / 8;
}
