// Small DOM and formatting helpers shared by every module of the page.
// Elements are built with `el` (never innerHTML), and inline styles are never written as
// attributes: the Content-Security-Policy forbids them, so positions go through the CSSOM.

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

// The same for SVG, whose elements live in their own namespace.
export function svgEl(tag, attributes = {}, text = null) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (text !== null) node.textContent = text;
  return node;
}

// One time format on the page: m:ss (h:mm:ss past an hour); to the tenth where it matters (loop points).
export function clock(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  const whole = Math.floor(seconds), h = Math.floor(whole / 3600), m = Math.floor(whole / 60) % 60;
  const ss = String(whole % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

export function clockTenths(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "–";
  const tenths = Math.round(seconds * 10);
  return `${clock(Math.floor(tenths / 10))}.${tenths % 10}`;
}

export function showMessage(node, text, kind = "error") {
  node.textContent = text;
  node.className = `message ${kind}`;
  node.hidden = !text;
}

// A file or link download the browser saves, started from script.
export function download(href) {
  const link = el("a", { href, download: "" });
  document.body.append(link);
  link.click();
  link.remove();
}

// Sizes and rates as people read them: 1.4 MB, 2.5 Mb/s (decimal units, as encoders count).
export function bytes(count) {
  if (!Number.isFinite(count)) return "–";
  const units = ["B", "kB", "MB", "GB"];
  let value = count, unit = 0;
  while (value >= 1000 && unit < units.length - 1) { value /= 1000; unit += 1; }
  return `${value >= 100 || unit === 0 ? Math.round(value) : value.toFixed(1)} ${units[unit]}`;
}

export function bitrate(bitsPerSecond) {
  if (!Number.isFinite(bitsPerSecond)) return "–";
  return bitsPerSecond >= 1e6 ? `${(bitsPerSecond / 1e6).toFixed(2)} Mb/s` : `${Math.round(bitsPerSecond / 1e3)} kb/s`;
}

// A duration to the hundredth under a minute (a clip's length matters to the frame), else m:ss.
export function seconds(value) {
  if (!Number.isFinite(value)) return "–";
  return value < 60 ? `${value.toFixed(2)} s` : clock(value);
}
