// Keyboard shortcuts of the player. Keys typed into a form control keep their usual
// meaning (arrows move a slider, Space presses a focused button); M and S act on the stem
// whose row holds the focus. On the position slider an arrow moves 1 s and Page Up /
// Page Down 5 s (the browser's own steps would be a hundredth of the song).
const TYPING = new Set(["INPUT", "SELECT", "TEXTAREA"]);
const PRESSABLE = new Set(["BUTTON", "A", "SUMMARY"]);

export function installShortcuts(getPlayer) {
  document.addEventListener("keydown", (event) => {
    const player = getPlayer();
    if (!player || event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target.id === "seek") {
      const steps = { ArrowLeft: -1, ArrowDown: -1, ArrowRight: 1, ArrowUp: 1, PageDown: -5, PageUp: 5 };
      const ends = { Home: 0, End: player.duration };
      if (event.key in steps) player.seekBy(steps[event.key]);
      else if (event.key in ends) player.seek(ends[event.key]);
      if (event.key in steps || event.key in ends) { event.preventDefault(); return; }
    }
    if (TYPING.has(target.tagName) && !(target.type === "range" && !event.key.startsWith("Arrow"))) return;
    const stemName = target.closest?.(".stem")?.dataset.stem;
    const stem = player.stems.find((s) => s.name === stemName);
    const actions = {
      " ": () => !PRESSABLE.has(target.tagName) && player.toggle(),
      m: () => stem && player.toggleMute(stem),
      s: () => stem && player.toggleSolo(stem),
      "[": () => player.setLoopA(),
      "]": () => player.setLoopB(),
      l: () => { player.toggleLoop(); },
      o: () => player.toggleCompare(),
      ArrowLeft: () => player.seekBy(-5),
      ArrowRight: () => player.seekBy(5),
    };
    const action = actions[event.key.length === 1 ? event.key.toLowerCase() : event.key];
    if (action && action() !== false) event.preventDefault();
  });
}
