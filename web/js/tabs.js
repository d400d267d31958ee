// The page's two sections, Songs and Video, as ARIA tabs over one shell (the operator panel
// stays below both). Click or ← → Home End on the tabs switch (automatic activation, as the
// WAI tabs pattern has it); the hash says which section a link or a reload opens:
// `#song=N` or nothing for the songs, `#video`, `#task=N` or `#media=N` for the video section.
import { $ } from "./dom.js";

const VIEWS = ["songs", "video"];
const VIDEO_KEYS = ["video", "task", "media"];
const listeners = [];
let current = null;

export function viewOfHash(hash = location.hash) {
  const keys = new URLSearchParams(hash.slice(1));
  return VIDEO_KEYS.some((key) => keys.has(key)) ? "video" : "songs";
}

export function currentView() { return current; }

// `listener(view)` runs after every switch, the first one at start-up included.
export function onViewChange(listener) { listeners.push(listener); }

export function selectView(view, { focus = false } = {}) {
  if (view === current) return;
  current = view;
  for (const name of VIEWS) {
    const tab = $(`#tab-${name}`), selected = name === view;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`#${name}-view`).hidden = !selected;
    if (selected && focus) tab.focus();
  }
  for (const listener of listeners) listener(view);
}

export function installTabs() {
  for (const name of VIEWS) $(`#tab-${name}`).addEventListener("click", () => selectView(name));
  $("#tabs").addEventListener("keydown", (event) => {
    const at = VIEWS.indexOf(current);
    const to = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: VIEWS.length - 1 }[event.key];
    if (to === undefined) return;
    event.preventDefault();
    selectView(VIEWS[(to + VIEWS.length) % VIEWS.length], { focus: true });
  });
  selectView(viewOfHash());
}
