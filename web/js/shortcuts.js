// Keyboard shortcuts of the player. Keys typed into a form control keep their usual
// meaning (arrows move a slider, Space presses a focused button); M and S act on the stem
// whose row holds the focus.
const TYPING = new Set(["INPUT", "SELECT", "TEXTAREA"]);
const PRESSABLE = new Set(["BUTTON", "A", "SUMMARY"]);

export function installShortcuts(getPlayer) {
  document.addEventListener("keydown", (event) => {
    const player = getPlayer();
    if (!player || event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (TYPING.has(target.tagName) && !(target.type === "range" && !event.key.startsWith("Arrow"))) return;
    const stemName = target.closest?.(".stem")?.dataset.stem;
    const stem = player.stems.find((s) => s.name === stemName);
    const actions = {
      " ": () => !PRESSABLE.has(target.tagName) && player.toggle(),
      m: () => stem && player.toggleMute(stem),
      s: () => stem && player.toggleSolo(stem),
      "[": () => player.setLoopPoint("a"),
      "]": () => player.setLoopPoint("b"),
      l: () => player.toggleLoop(),
      o: () => player.toggleCompare(),
      ArrowLeft: () => player.seekBy(-5),
      ArrowRight: () => player.seekBy(5),
    };
    const action = actions[event.key.length === 1 ? event.key.toLowerCase() : event.key];
    if (action && action() !== false) event.preventDefault();
  });
}
