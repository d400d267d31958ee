// One truth about a worker's liveness, for the page and the dashboard alike. Both read the
// same registry (src/server/presence.py: `last_heartbeat_age`, `heartbeat_seconds`,
// `online`) and age it with the same clock between two pushes, so a worker is:
//   "online"  heard from within one heart-beat interval (plus the delivery's slack);
//   "stale"   silent for longer (crashed or hung: its job will be redone elsewhere);
//   "offline" silent for two intervals: the registry drops it and its running jobs are lost.
const SLACK_SECONDS = 0.5;   // a live worker's presence is at most one interval old, plus its delivery

export function ageOf(worker, receivedAt) {
  return worker.last_heartbeat_age + (Date.now() - receivedAt) / 1000;
}

export function liveness(worker, receivedAt) {
  if (worker.online === false) return "offline";
  const age = ageOf(worker, receivedAt);
  if (age > 2 * worker.heartbeat_seconds) return "offline";
  return age > worker.heartbeat_seconds + SLACK_SECONDS ? "stale" : "online";
}
