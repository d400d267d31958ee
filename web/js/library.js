// The song list and the upload queue. Several files (chosen or dropped) are uploaded one
// after another, each with its own progress row; every song is a button, so the list is
// reachable and usable from the keyboard.
import { $, el, clock, showMessage } from "./dom.js";

export function renderLibrary(songs, selectedId, onOpen) {
  const items = [...songs.values()].sort((a, b) => b.music_id - a.music_id);
  $("#library-empty").hidden = items.length > 0;
  $("#library").replaceChildren(...items.map((song) => {
    const busy = song.state === "processing";
    return el("li", { "data-id": song.music_id, class: song.music_id === selectedId ? "selected" : "" },
      el("button", { class: "song-row", "aria-current": song.music_id === selectedId ? "true" : null,
                     onclick: () => onOpen(song.music_id, { scroll: true }) },
        el("span", { class: "title" }, song.name, song.band ? el("span", { class: "muted" }, ` — ${song.band}`) : ""),
        el("span", { class: "meta" }, el("span", {}, clock(song.duration)),
           el("span", { class: `state ${song.state}` }, song.state),
           busy ? el("span", {}, `${song.progress}%`) : "")));
  }));
}

// Uploads files one at a time (a phone on a slow link should not split it five ways),
// calling `onUploaded(summary, batch)` for each one the server keeps.
export class UploadQueue {
  constructor(onUploaded) {
    this.onUploaded = onUploaded;
    this.waiting = [];
    this.busy = false;
  }

  add(files) {
    const batch = { size: files.length, ids: [] };
    showMessage($("#upload-message"), "");
    for (const file of files) {
      const label = el("span", { class: "label" }, `${file.name}: waiting`);
      const bar = el("progress", { max: 100, value: 0, "aria-label": `upload of ${file.name}` });
      const row = el("li", {}, label, bar);
      $("#uploads").append(row);
      this.waiting.push({ file, batch, row, label, bar });
    }
    this.next();
    return batch;
  }

  next() {
    if (this.busy || !this.waiting.length) return;
    this.busy = true;
    const item = this.waiting.shift();
    this.send(item).finally(() => { this.busy = false; this.next(); });
  }

  send({ file, batch, row, label, bar }) {
    return new Promise((resolve) => {
      const request = new XMLHttpRequest();   // fetch() cannot report upload progress
      request.open("POST", "/music");
      request.setRequestHeader("Content-Type", "application/octet-stream");
      request.setRequestHeader("X-Filename", encodeURIComponent(file.name));
      request.upload.onprogress = (event) => {
        if (!event.lengthComputable) return;
        bar.value = Math.round(100 * event.loaded / event.total);
        label.textContent = bar.value < 100 ? `${file.name}: uploading ${bar.value}%` : `${file.name}: checking…`;
      };
      request.onload = () => {
        row.remove();
        let data = {};
        try { data = JSON.parse(request.responseText); } catch (_) { /* keep {} */ }
        if (request.status !== 200) {
          showMessage($("#upload-message"), `${file.name} was refused: ${data.error || request.statusText}`);
        } else {
          batch.ids.push(data.music_id);
          this.onUploaded(data, batch);
        }
        resolve();
      };
      request.onerror = () => {
        row.remove();
        showMessage($("#upload-message"), `Uploading ${file.name} failed: the server did not answer.`);
        resolve();
      };
      request.send(file);
    });
  }
}

export function setUpDropzone(queue) {
  const zone = $("#dropzone"), input = $("#file-input");
  input.addEventListener("change", () => { if (input.files.length) queue.add([...input.files]); input.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, (e) => { e.preventDefault(); zone.classList.remove("over"); });
  }
  zone.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) queue.add([...e.dataTransfer.files]); });
}
