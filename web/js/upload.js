// One file sent to the server with its upload progress (fetch() cannot report it): the raw
// body, its name in `X-Filename`, as the songs are sent. Resolves with the JSON answer;
// rejects with the server's own `{"error": ...}` text.
export function uploadFile(path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const request = new XMLHttpRequest();
    request.open("POST", path);
    request.setRequestHeader("Content-Type", "application/octet-stream");
    request.setRequestHeader("X-Filename", encodeURIComponent(file.name));
    request.upload.onprogress = (event) => { if (event.lengthComputable) onProgress(event.loaded / event.total); };
    request.onload = () => {
      let data = {};
      try { data = JSON.parse(request.responseText); } catch (_) { /* keep {} */ }
      if (request.status >= 200 && request.status < 300) resolve(data);
      else reject(new Error(data.error || `${request.status} ${request.statusText}`));
    };
    request.onerror = () => reject(new Error("the server did not answer"));
    request.send(file);
  });
}
