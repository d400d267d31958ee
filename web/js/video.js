// The video section's state and flow: upload a video (`POST /media`), choose a kind's
// settings (kinds.js), run it as a task (`POST /tasks`), follow it live, cancel it, and
// compare the result with the original (videotask.js); earlier tasks are listed to reopen
// (videolist.js); the open task's workers are followed in frames (videoframes.js). As on the
// songs side, what is shown comes from the server only: HTTP answers and `task` events fill
// `media` and `tasks`, user actions just call the server.
import { api } from "./api.js";
import { $, $$, bytes, el, showMessage } from "./dom.js";
import { ParamsForm, kindLabel, videoKinds, valueLabel } from "./kinds.js";
import { PRESETS, estimateBytes, presetValues } from "./presets.js";
import { clearTimeline, drawTimeline, timelineFor, timelineRunning } from "./operator.js";
import { uploadFile } from "./upload.js";
import { renderShares } from "./videoframes.js";
import { renderVideoList } from "./videolist.js";
import { canPlay, installResultPlayer, isActive, renderMedia, renderTask } from "./videotask.js";

const media = new Map();   // media_id -> its summary (the list shows those with a picture)
const tasks = new Map();   // task_id -> latest status, of the kinds that run on video
let kinds = [];            // those kinds, from GET /kinds
let openMediaId = null, openTaskId = null;
let form = null, formKey = null;   // the settings form, and which media/task it was built for
const lastParams = {};     // kind -> the settings last sent: where the next video starts from
let active = false;        // the section is on screen
let loaded = false;        // the first refresh is in: the hash's task or video can be opened in place
let uploading = false;
let shares = { taskId: null, data: null, final: false, at: 0 };   // the open task's GET /tasks/{id}/workers

const list = (answer, key) => (Array.isArray(answer) ? answer : answer?.[key] ?? []);
const isVideoKind = (name) => (kinds.length ? kinds.some((k) => k.name === name) : name === "transcode");
const STAGES = { queued: 0, running: 1, done: 2, failed: 2, cancelled: 2 };
const progressOf = (task) => 1000 * (STAGES[task.state] ?? 0) + (task.jobs_done ?? 0);
const setHash = (value) => history.replaceState(null, "", `#${value}`);

export function initVideo() {
  setUpUpload();
  installResultPlayer();
  $("#task-form").addEventListener("submit", (event) => { event.preventDefault(); submit(); });
  $("#task-kind").addEventListener("change", () => buildForm($("#task-kind").value, null, true));
  $("#cancel-task").addEventListener("click", cancel);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) refreshShares(); });
  refresh();
}

// Everything again (start-up and after the live link came back: events sent meanwhile are lost).
export async function refresh() {
  try {
    kinds = await videoKinds();
    const [allMedia, ...lists] = await Promise.all([api("GET", "/media"),
      ...kinds.map((k) => api("GET", `/tasks?kind=${encodeURIComponent(k.name)}`))]);
    media.clear();
    for (const m of list(allMedia, "media")) media.set(m.media_id, m);
    tasks.clear();
    for (const answer of lists) for (const t of list(answer, "tasks")) tasks.set(t.task_id, t);
  } catch (error) {
    showMessage($("#video-message"), `Video tasks are not available here: ${error.message}`);
    return;
  }
  loaded = true;
  showMessage($("#video-message"), kinds.length ? "" : "No worker kind of this deployment runs on video.");
  fillKindChoice();
  renderList();
  if (openTaskId !== null) openTask(openTaskId);
  else if (openMediaId !== null) openMedia(openMediaId);
  else if (active) openFromHash();
}

export function onTask(task) {
  if (!isVideoKind(task.kind)) return;
  tasks.set(task.task_id, { ...tasks.get(task.task_id), ...task });
  if (!media.has(task.media_id)) ensureMedia(task.media_id).then(renderList);
  renderList();
  if (task.task_id === openTaskId) { render(); refreshTimeline(); refreshShares(); }
}

export function onWorkers() {
  if (isActive(tasks.get(openTaskId)) || timelineRunning) refreshTimeline();
  if (isActive(tasks.get(openTaskId))) refreshShares();
}

// Elapsed times and the live speed move on between events; the workers' shares are fetched
// again if no event brought them for a while (a worker deep in a long job sends none).
export function tick() {
  const task = tasks.get(openTaskId);
  if (!active || !isActive(task)) return;
  renderTask(task, media.get(openMediaId));
  renderShares(task, media.get(openMediaId), sharesOf(openTaskId));
  if (Date.now() - shares.at > SHARES_IDLE_MS) refreshShares();
}

export function onReset() {
  media.clear();
  tasks.clear();
  close();
}

export function showVideo() {
  active = true;
  timelineFor("video task");
  const wanted = new URLSearchParams(location.hash.slice(1));
  if (wanted.has("task") || wanted.has("media")) { if (loaded) openFromHash(); }   // else the first refresh will
  else setHash(openTaskId !== null ? `task=${openTaskId}` : openMediaId !== null ? `media=${openMediaId}` : "video");
  if (openTaskId !== null) { refreshTimeline(); refreshShares(); }
  else if (openMediaId !== null) clearTimeline("No task on this video yet.");
}

export function hideVideo() {
  active = false;
  for (const video of $$("#video-view video")) video.pause();
}

export function openFromHash() {
  const wanted = new URLSearchParams(location.hash.slice(1));
  const task = Number(wanted.get("task")), video = Number(wanted.get("media"));
  if (task && task !== openTaskId) openTask(task, { scroll: true });
  else if (video && !task && (video !== openMediaId || openTaskId !== null)) openMedia(video, { scroll: true });
}

// ---------------------------------------------------------------- opening

async function openTask(id, { scroll = false } = {}) {
  openTaskId = id;
  if (active) { setHash(`task=${id}`); clearTimeline("Loading…"); }
  let task = tasks.get(id);
  try {
    if (!task) tasks.set(id, task = await api("GET", `/tasks/${id}`));
    await ensureMedia(task.media_id);
  } catch (error) {
    if (openTaskId === id) { close(); showMessage($("#video-message"), `Task ${id}: ${error.message}`); }
    return;
  }
  if (openTaskId !== id) return;
  openMediaId = task.media_id;
  buildForm(task.kind, task.params);
  render();
  renderList();
  refreshTimeline();
  refreshShares();
  if (scroll) reveal();
}

async function openMedia(id, { scroll = false } = {}) {
  openTaskId = null;
  openMediaId = id;
  if (active) { setHash(`media=${id}`); clearTimeline("No task on this video yet."); }
  try { await ensureMedia(id); } catch (error) {
    if (openMediaId === id) { close(); showMessage($("#video-message"), `Video ${id}: ${error.message}`); }
    return;
  }
  if (openMediaId !== id || openTaskId !== null) return;
  buildForm(form?.kind.name ?? "transcode", null);
  render();
  renderList();
  if (scroll) reveal();
}

function close() {
  openMediaId = openTaskId = null;
  form = formKey = null;
  $("#video-panel").hidden = true;
  for (const video of $$("#video-panel video")) video.pause();
  renderList();
  if (active) { setHash("video"); clearTimeline(); }
}

async function ensureMedia(id) {
  if (!media.has(id)) media.set(id, await api("GET", `/media/${id}`));
  return media.get(id);
}

// On a phone the panel is below the list: bring it into view.
function reveal() {
  const panel = $("#video-panel"), top = panel.getBoundingClientRect().top;
  if (top > window.innerHeight * 0.5 || top < 0) panel.scrollIntoView({ block: "start" });
  panel.focus({ preventScroll: true });
}

function render() {
  const item = media.get(openMediaId);
  $("#video-panel").hidden = !item;
  if (!item) return;
  renderMedia(item);
  const task = openTaskId === null ? null : tasks.get(openTaskId);
  renderTask(task, item);
  renderShares(task, item, sharesOf(openTaskId));
  placeForm(Boolean(task));
}

const LEGENDS = { transcode: ["Transcode settings", "Transcode again, other settings"],
                  faceblur: ["Face blurring settings", "Blur faces again, other settings"] };

// A fresh video: the settings come first. An open task: its progress and result come first,
// the settings below them are for another go.
function placeForm(belowResult) {
  const setup = $("#task-setup"), panel = $("#video-panel");
  if (belowResult !== (setup.nextElementSibling === null)) {
    if (belowResult) panel.append(setup); else panel.insertBefore(setup, $("#task-progress"));
  }
  const kind = form?.kind.name;
  const [fresh, again] = LEGENDS[kind] ?? [`${kindLabel(kind)}: settings`, `${kindLabel(kind)} again, other settings`];
  $("#task-legend").textContent = belowResult ? again : fresh;
}

function renderList() {
  renderVideoList({ media, tasks, kinds, open: { mediaId: openMediaId, taskId: openTaskId },
                    onOpen: (what, id) => (what === "task" ? openTask(id, { scroll: true }) : openMedia(id, { scroll: true })) });
}

// The open task's jobs, fetched again at most a few times a second however many events arrive.
let timelineTimer = null;
function refreshTimeline() {
  if (timelineTimer || !active) return;
  timelineTimer = setTimeout(async () => {
    timelineTimer = null;
    const id = openTaskId;
    if (id === null || !active) return;
    try {
      const attempts = await api("GET", `/tasks/${id}/timeline`);
      if (id === openTaskId && active) drawTimeline(attempts);
    } catch (_) { /* task gone, or server away: the banner says so */ }
  }, 300);
}

// The open task's workers in frames (GET /tasks/{id}/workers). Fetched when the task or the
// workers move (their live events: a job started or done) and, failing those, every
// SHARES_IDLE_MS while the task runs; at most once every SHARES_EVERY_MS however many events
// arrive, and never while the page or the section is hidden (nobody would see it). A task that
// has ended changes no more: its shares are fetched once and kept.
const SHARES_EVERY_MS = 1000, SHARES_IDLE_MS = 2000;
let sharesTimer = null, sharesAsked = 0, sharesShown = 0;   // answers can cross: an older one must not win
const sharesOf = (id) => (shares.taskId === id ? shares.data : null);

function refreshShares() {
  if (sharesTimer || !active || document.hidden || openTaskId === null) return;
  if (shares.taskId === openTaskId && shares.final) return;
  sharesTimer = setTimeout(async () => {
    sharesTimer = null;
    const id = openTaskId;
    if (id === null || !active || document.hidden) return;
    const ended = !isActive(tasks.get(id));   // ended before the question: the answer is final
    const asked = ++sharesAsked;
    shares.at = Date.now();
    try {
      const data = await api("GET", `/tasks/${id}/workers`);
      if (id !== openTaskId || asked < sharesShown) return;
      sharesShown = asked;
      shares = { taskId: id, data, final: ended, at: shares.at };
      renderShares(tasks.get(id), media.get(openMediaId), data);
    } catch (_) { /* task gone, or server away: the banner says so */ }
  }, Math.max(0, shares.at + SHARES_EVERY_MS - Date.now()));
}

// ---------------------------------------------------------------- the settings form

function fillKindChoice() {
  const select = $("#task-kind");
  select.replaceChildren(...kinds.map((k) => new Option(kindLabel(k.name), k.name)));
  $("#task-kind-field").hidden = kinds.length < 2;
}

// The form for `kindName`, starting from `values` (an open task's) or the settings last sent.
function buildForm(kindName, values, force = false) {
  const key = `${openMediaId}/${openTaskId}`;
  if (!force && form && formKey === key && form.kind.name === kindName) return;
  const kind = kinds.find((k) => k.name === kindName) ?? kinds.find((k) => k.name === "transcode") ?? kinds[0];
  $("#task-form").hidden = !kind;
  if (!kind) { form = null; return; }
  formKey = key;
  $("#task-kind").value = kind.name;
  $("#task-kind-hint").textContent = kind.description ?? "";
  $("#run-task").textContent = kindLabel(kind.name);
  form = new ParamsForm($("#task-params"), kind, { values: values ?? lastParams[kind.name] ?? {},
                                                   sourceHeight: media.get(openMediaId)?.video?.height });
  setUpPresets(kind, values ?? lastParams[kind.name]);
  const codec = form.control("codec");
  if (codec) {
    const note = () => { $("#codec-note").textContent = codec.value && !canPlay(codec.value)
      ? `This browser cannot play ${valueLabel(codec.value)}: the result can be downloaded, not watched here.` : ""; };
    codec.addEventListener("change", note);
    note();
  } else {
    $("#codec-note").textContent = "";
  }
}

// The transcode kind in people's words (js/presets.js): a choice of presets that fill the
// raw fields, which wait under "Advanced"; a task reopened with its own settings opens as
// "Custom". Other kinds show their fields as they are.
function setUpPresets(kind, values) {
  const presets = $("#task-presets"), advanced = $("#task-advanced"), estimate = $("#size-estimate");
  const transcode = kind.name === "transcode" && form.control("codec");
  presets.hidden = !transcode;
  estimate.hidden = !transcode;
  advanced.classList.toggle("plain", !transcode);
  advanced.open = !transcode;
  if (!transcode) return;
  const item = media.get(openMediaId);
  const choose = (id) => {
    for (const radio of presets.querySelectorAll("input")) radio.checked = radio.value === id;
    const preset = presetValues(id, item);
    if (preset) form.fill(preset);
    else advanced.open = true;
    showEstimate();
  };
  const showEstimate = () => {
    const bytesOut = estimateBytes(form.raw(), item);
    if (bytesOut === null) { estimate.textContent = ""; return; }
    const share = Math.round(100 * bytesOut / item.size);
    estimate.textContent = `Estimated size: about ${bytes(bytesOut)}, ${share} % of the original (${bytes(item.size)})` +
      (share >= 100 ? ": larger than the original; lower the quality or the height, or choose Small." : ".");
    estimate.className = share >= 100 ? "small warn-text" : "small muted";
  };
  $("#preset-choices").replaceChildren(...PRESETS.map((p) => el("label", { class: "preset" },
    el("input", { type: "radio", name: "preset", value: p.id, onchange: () => choose(p.id) }),
    el("span", {}, el("strong", {}, p.label), el("span", { class: "muted small" }, p.hint)))));
  $("#task-params").oninput = () => {   // a raw field changed by hand: Custom
    if (!presets.querySelector("input[value='custom']").checked) choose("custom");
    showEstimate();
  };
  $("#task-params").onchange = $("#task-params").oninput;
  if (values && Object.keys(values).length) choose("custom");
  else choose("web");
  advanced.open = Boolean(values && Object.keys(values).length);
}

async function submit() {
  if (!form || openMediaId === null || !$("#task-form").reportValidity()) return;
  const kind = form.kind.name, params = form.read(), button = $("#run-task");
  button.disabled = true;
  showMessage($("#video-error"), "");
  try {
    const { task_id: id } = await api("POST", "/tasks", { kind, media_id: openMediaId, params });
    lastParams[kind] = params;
    const task = await api("GET", `/tasks/${id}`);
    const known = tasks.get(id);                       // an event may already have brought a newer status
    if (!known || progressOf(known) <= progressOf(task)) tasks.set(id, task);
    formKey = `${openMediaId}/${id}`;                  // the form shows what was sent: keep it as it is
    await openTask(id);
    if (document.activeElement === document.body) $("#video-panel").focus({ preventScroll: true });
  } catch (error) {
    form.markInvalid(error.message);
    showMessage($("#video-error"), `Could not start: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}

async function cancel() {
  const id = openTaskId, button = $("#cancel-task");
  if (id === null) return;
  button.disabled = true;
  try {
    await api("DELETE", `/tasks/${id}`);
    onTask(await api("GET", `/tasks/${id}`));
  } catch (error) {
    showMessage($("#video-error"), `Could not cancel: ${error.message}`);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- upload

function setUpUpload() {
  const zone = $("#video-dropzone"), input = $("#video-file-input");
  input.addEventListener("change", () => { if (input.files.length) upload(input.files[0]); input.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.remove("over"); });
  }
  zone.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]); });
}

const SONG_EXTENSIONS = /\.(mp3|wav|flac|ogg|oga|opus|m4a|aac|aiff?|wma)$/i;
const isSong = (file) => file.type.startsWith("audio/") || (!file.type.startsWith("video/") && SONG_EXTENSIONS.test(file.name));

async function upload(file) {
  const message = $("#video-message"), row = $("#video-upload"), label = $("#video-upload-label");
  const bar = $("#video-upload-progress");
  if (uploading) { showMessage(message, "One upload at a time: wait for the one under way."); return; }
  if (isSong(file)) {   // refused before it is stored: a song belongs to the Songs tab
    showMessage(message, `${file.name} is a song, not a video: drop it on the Songs tab to separate its instruments.`);
    return;
  }
  uploading = true;
  showMessage(message, "");
  bar.value = 0;
  label.textContent = `${file.name}: uploading`;
  row.hidden = false;
  try {
    const item = await uploadFile("/media", file, (share) => {
      bar.value = Math.round(100 * share);
      label.textContent = share < 1 ? `${file.name}: uploading ${bar.value}%` : `${file.name}: checking…`;
    });
    media.set(item.media_id, item);
    if (!item.video) {
      showMessage(message, `${file.name} has no picture, only sound: the Songs tab separates its instruments.`);
      return;
    }
    renderList();
    openMedia(item.media_id, { scroll: true });
  } catch (error) {
    showMessage(message, `${file.name} was refused: ${error.message}`);
  } finally {
    uploading = false;
    row.hidden = true;
  }
}
