// The live link to the server (Server-Sent Events). When it breaks, a banner says since
// when the server is unreachable and the live figures are greyed out, so nothing frozen
// passes for current; when it comes back, the page fetches everything again, since
// events sent meanwhile are lost.
import { $ } from "./dom.js";

export function connect(handlers, onReconnected, url = "/events") {
  let lostAt = null;
  const pill = $("#connection"), banner = $("#offline-banner");

  const lost = () => {
    if (lostAt === null) lostAt = new Date();
    pill.textContent = "offline";
    pill.className = "pill bad";
    banner.textContent = `The server is unreachable since ${lostAt.toLocaleTimeString()}: the figures below are ` +
      "from then. Reconnecting…";
    banner.hidden = false;
    document.body.classList.add("offline");
  };

  const open = () => {
    const source = new EventSource(url);
    source.onopen = () => {
      pill.textContent = "live";
      pill.className = "pill ok";
      if (lostAt !== null) {
        lostAt = null;
        banner.hidden = true;
        document.body.classList.remove("offline");
        onReconnected();
      }
    };
    source.onerror = () => {
      lost();
      if (source.readyState === EventSource.CLOSED) setTimeout(open, 2000);   // the browser gave up; we don't
    };
    for (const [name, handler] of Object.entries(handlers)) {
      source.addEventListener(name, (event) => handler(JSON.parse(event.data)));
    }
  };
  open();
  return { lost };
}
