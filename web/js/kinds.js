// A job kind's settings form, generated from the server's `GET /kinds`: one labelled control
// per parameter (a select for choices, a number with its bounds, text otherwise), its
// description as the hint, its default preselected. Only values that differ from the
// default are sent, so a default the server picks per codec still applies. Two conveniences
// on top: `crf` and `bitrate` are one "rate control" choice (an encoder takes one or the
// other), and `height` is a list of presets: the source's, 1080p … 240p. Kinds and their
// values are named for people ("Blur faces", "Mosaic"); unknown ones show as the server names them.
import { api } from "./api.js";
import { el } from "./dom.js";

let kindsAnswer = null;   // one GET /kinds per page load, retried after a failure

export async function videoKinds() {
  if (!kindsAnswer) kindsAnswer = api("GET", "/kinds").catch((error) => { kindsAnswer = null; throw error; });
  const kinds = await kindsAnswer;
  return (Array.isArray(kinds) ? kinds : kinds.kinds || []).filter((kind) => kind.media === "video");
}

const KIND_LABELS = { transcode: "Transcode", faceblur: "Blur faces", separate: "Separate instruments" };
const VALUE_LABELS = { h264: "H.264", hevc: "HEVC (H.265)", vp9: "VP9", av1: "AV1",
                       mp4: "MP4", mkv: "Matroska (.mkv)", webm: "WebM",
                       blur: "Blur", mosaic: "Mosaic", solid: "Solid box" };
const PARAM_LABELS = { codec: "Codec", crf: "Quality (CRF)", bitrate: "Bitrate", height: "Height",
                       preset: "Encoder preset", container: "Container",
                       mode: "How faces are hidden", threshold: "Detection threshold", mask_scale: "Mask scale",
                       window: "Smoothing (frames)" };
const AUTOMATIC = { container: "by codec", preset: "by codec", crf: "by codec", height: "source" };
const HEIGHTS = [2160, 1440, 1080, 720, 480, 360, 240];
const RATE = ["crf", "bitrate"];

export const valueLabel = (value) => VALUE_LABELS[value] ?? String(value);
export const kindLabel = (name) => KIND_LABELS[name] ?? String(name);
const paramLabel = (name) => PARAM_LABELS[name] ?? name.charAt(0).toUpperCase() + name.slice(1).replaceAll("_", " ");

function typeOf(param) {
  const type = String(param.type).toLowerCase();
  if (type.startsWith("int")) return "integer";
  if (type.startsWith("num") || type.startsWith("float")) return "number";
  if (type.startsWith("bool")) return "boolean";
  if (type.startsWith("arr") || type.startsWith("list")) return "array";
  return "string";
}

// A task's settings in a few words, for the list: "H.264 · CRF 23 · 360p".
export function summary(kind, params = {}) {
  if (!kind) return Object.values(params).filter((v) => v !== null).join(" · ");
  const parts = [];
  for (const param of kind.params) {
    const value = params[param.name] ?? (param.name === "crf" && params.bitrate != null ? null : param.default);
    if (value === null || value === undefined) continue;
    if (param.choices) parts.push(valueLabel(value));
    else if (param.name === "height") parts.push(`${value}p`);
    else if (param.name === "crf") parts.push(`CRF ${value}`);
    else if (param.name === "bitrate") parts.push(value);
    else if (value !== param.default) parts.push(`${paramLabel(param.name).toLowerCase()} ${value}`);
  }
  return parts.join(" · ");
}

export class ParamsForm {
  // `values`: the settings to start from (an earlier task's); `sourceHeight` marks upscaling presets.
  constructor(container, kind, { values = {}, sourceHeight = null } = {}) {
    this.kind = kind;
    this.controls = new Map();   // name -> { param, input }
    const names = kind.params.map((p) => p.name);
    const rate = RATE.every((name) => names.includes(name));
    const nodes = [];
    for (const param of kind.params) {
      if (rate && param.name === "bitrate") continue;   // drawn with crf
      nodes.push(rate && param.name === "crf" ? this.rateControl(values)
        : this.field(param, values[param.name], sourceHeight));
    }
    container.replaceChildren(...nodes);
  }

  field(param, value, sourceHeight) {
    const id = `param-${param.name}`, hint = `${id}-hint`;
    const input = this.input(param, value === undefined ? param.default : value, sourceHeight);
    Object.assign(input, { id, name: param.name });
    if (param.description) input.setAttribute("aria-describedby", hint);
    input.addEventListener("input", () => input.removeAttribute("aria-invalid"));
    this.controls.set(param.name, { param, input });
    const label = el("label", { for: id }, paramLabel(param.name));
    return el("div", { class: `param ${typeOf(param)}`, "data-param": param.name },
      typeOf(param) === "boolean" ? el("div", { class: "check" }, input, label) : [label, input],
      param.description ? el("span", { id: hint, class: "muted small" }, param.description) : null);
  }

  input(param, value, sourceHeight) {
    const type = typeOf(param);
    if (param.choices || (param.name === "height" && type === "integer")) {
      const automatic = param.default === null || param.default === undefined;
      let options = (param.choices ?? HEIGHTS.filter((h) => h >= (param.minimum ?? 0) && h <= (param.maximum ?? h)))
        .map((choice) => [choice, param.name === "height" ? heightLabel(choice, sourceHeight) : valueLabel(choice)]);
      if (param.name === "height" && !param.choices && value != null && !options.some(([h]) => h === value)) {
        options = [...options, [value, heightLabel(value, sourceHeight)]].sort((a, b) => b[0] - a[0]);
      }
      if (automatic) {
        const text = param.name === "height" && sourceHeight ? `source (${sourceHeight}p)` : AUTOMATIC[param.name] ?? "automatic";
        options.unshift(["", text]);
      }
      return el("select", {}, options.map(([choice, text]) =>
        el("option", { value: choice, selected: String(choice) === String(value ?? "") ? "" : null }, text)));
    }
    if (type === "boolean") return el("input", { type: "checkbox", checked: value ? "" : null });
    if (type === "integer" || type === "number") {
      // faceblur's `window` is an odd count of frames: from an odd minimum in steps of 2, the
      // browser's own check (and the arrows) allow odd values only, before the server says no
      const odd = param.name === "window" && type === "integer" && Math.abs(param.minimum % 2) === 1;
      return el("input", { type: "number", inputmode: type === "integer" ? "numeric" : "decimal",
                           step: odd ? 2 : type === "integer" ? 1 : "any", min: param.minimum, max: param.maximum,
                           value: value ?? "", placeholder: AUTOMATIC[param.name] ?? "automatic" });
    }
    const text = Array.isArray(value) ? value.join(", ") : value ?? "";
    return el("input", { type: "text", value: text, autocomplete: "off", spellcheck: "false",
                         placeholder: param.name === "bitrate" ? "e.g. 2500k" : (param.default == null ? "automatic" : null),
                         pattern: param.name === "bitrate" ? "\\d+(\\.\\d+)?[kKmM]?" : null,
                         title: param.name === "bitrate" ? "bits per second, like 2500k or 2.5M" : null });
  }

  // CRF or bitrate: a radio pair, the unchosen field disabled (so it is neither sent nor validated).
  rateControl(values) {
    const params = Object.fromEntries(this.kind.params.map((p) => [p.name, p]));
    const fields = { crf: this.field(params.crf, values.crf), bitrate: this.field(params.bitrate, values.bitrate) };
    const radios = {};
    const choose = (mode) => {
      this.rateMode = mode;
      for (const name of RATE) {
        radios[name].checked = name === mode;
        fields[name].hidden = name !== mode;
        this.controls.get(name).input.disabled = name !== mode;
      }
    };
    const radio = (mode, text) => el("label", { class: "check" },
      radios[mode] = el("input", { type: "radio", name: "rate-mode", value: mode, onchange: () => choose(mode) }), text);
    const group = el("fieldset", { class: "param rate", "data-param": "rate" },
      el("legend", {}, "Rate control"),
      el("div", { class: "choices" }, radio("crf", "Constant quality (CRF)"), radio("bitrate", "Target bitrate")),
      fields.crf, fields.bitrate);
    choose(values.bitrate != null && values.bitrate !== "" ? "bitrate" : "crf");
    this.chooseRate = choose;
    return group;
  }

  // Put raw values in the controls (a preset's); `rate` chooses CRF or bitrate.
  fill(values) {
    for (const [name, value] of Object.entries(values)) {
      const input = this.control(name);
      if (input) input.value = value;
    }
    if (values.rate && this.chooseRate) this.chooseRate(values.rate);
  }

  // The controls' raw values, as `fill` takes them.
  raw() {
    const values = Object.fromEntries([...this.controls].map(([name, { input }]) => [name, input.value]));
    if (this.rateMode) values.rate = this.rateMode;
    return values;
  }

  // The parameters to send: what differs from the defaults, in the types the kind declares.
  read() {
    const params = {};
    for (const [name, { param, input }] of this.controls) {
      if (input.disabled) continue;
      const value = parse(param, input);
      if (value === null || JSON.stringify(value) === JSON.stringify(param.default ?? null)) continue;
      params[name] = value;
    }
    return params;
  }

  // The server's 400 names the parameter it refused: point at that control.
  markInvalid(message) {
    let first = null;
    for (const [name, { input }] of this.controls) {
      if (new RegExp(`\\b${name}\\b`).test(message)) {
        input.setAttribute("aria-invalid", "true");
        first ??= input;
      }
    }
    first?.focus();
  }

  // The control of one parameter, if the form has one.
  control(name) { return this.controls.get(name)?.input ?? null; }
}

function heightLabel(height, sourceHeight) {
  return sourceHeight && height > sourceHeight ? `${height}p (upscale)` : `${height}p`;
}

function parse(param, input) {
  const type = typeOf(param);
  if (type === "boolean") return input.checked;
  const text = input.value.trim();
  if (text === "") return null;
  if (type === "integer" || (param.name === "height" && type !== "string")) return Number.parseInt(text, 10);
  if (type === "number") return Number(text);
  if (type === "array") return text.split(",").map((item) => item.trim()).filter(Boolean);
  return text;
}
