// The video section's list: the uploaded videos with no task yet, then every task (newest
// first) with its video, settings, state and progress. Each row is a button that opens it;
// the keyboard focus stays on its row when live updates redraw the list.
import { $, el } from "./dom.js";
import { kindLabel, summary } from "./kinds.js";

// media, tasks: Maps by id; kinds: the video kinds; open: {mediaId, taskId}; onOpen(kind, id).
export function renderVideoList({ media, tasks, kinds, open, onOpen }) {
  const list = $("#video-list");
  const focused = document.activeElement?.closest?.("#video-list li");
  const focusKey = focused ? (focused.dataset.task ? `task-${focused.dataset.task}` : `media-${focused.dataset.media}`) : null;

  const used = new Set([...tasks.values()].map((t) => t.media_id));
  const fresh = [...media.values()].filter((m) => m.video && !used.has(m.media_id)).sort((a, b) => b.media_id - a.media_id);
  const ordered = [...tasks.values()].sort((a, b) => b.task_id - a.task_id);
  $("#video-list-empty").hidden = fresh.length + ordered.length > 0;

  const rows = [
    ...fresh.map((m) => row({ "data-media": m.media_id }, open.taskId === null && open.mediaId === m.media_id,
      () => onOpen("media", m.media_id), m.name,
      el("span", {}, `${m.video.width}×${m.video.height}`), el("span", { class: "state" }, "no task yet"))),
    ...ordered.map((t) => {
      const kind = kinds.find((k) => k.name === t.kind);
      const running = t.state === "running";
      return row({ "data-task": t.task_id }, open.taskId === t.task_id, () => onOpen("task", t.task_id),
        media.get(t.media_id)?.name ?? `video ${t.media_id}`,
        kinds.length > 1 ? el("span", {}, kindLabel(t.kind)) : null,
        el("span", {}, summary(kind, t.params)),
        el("span", { class: `state ${t.state}` }, t.state),
        running ? el("span", {}, `${Math.round(t.progress ?? 0)}%`) : null);
    }),
  ];
  list.replaceChildren(...rows);
  if (focusKey) {
    const [what, id] = focusKey.split("-");
    list.querySelector(`li[data-${what}="${id}"] button`)?.focus({ preventScroll: true });
  }
}

function row(key, current, onclick, title, ...meta) {
  return el("li", key,
    el("button", { class: "song-row", "aria-current": current ? "true" : null, onclick },
      el("span", { class: "title" }, title),
      el("span", { class: "meta" }, ...meta)));
}
