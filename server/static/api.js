// This server's Wiro API from the browser: signed POSTs, and following one task live (the WebSocket,
// falling back to polling Task/Detail when the socket cannot be used).

import { authHeaders } from "./sign.js";

export const SLUG = { slugowner: "codexq", slugproject: "Particalize" };
export const TERMINAL = ["task_postprocess_end", "task_cancel"];

const credentials = { key: "", secret: "" };

export function setCredentials(key, secret) {
  credentials.key = key.trim();
  credentials.secret = secret.trim();
}

export class ApiError extends Error {}

/** POST a JSON body (or a FormData) to /v1/...; the parsed answer, or ApiError with Wiro's message. */
export async function call(path, body = {}) {
  const headers = await authHeaders(credentials.key, credentials.secret);
  const init = { method: "POST", headers };
  if (body instanceof FormData) {
    init.body = body;
  } else {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let answer;
  try {
    answer = await response.json();
  } catch {
    throw new ApiError(`${path}: HTTP ${response.status} (not JSON)`);
  }
  if (!answer.result) {
    const text = (answer.errors || []).map((e) => e.message).join("; ") || `HTTP ${response.status}`;
    throw new ApiError(text);
  }
  return answer;
}

/** The step progress Task/Detail's debugoutput carries ("step 3/30 (10%), ..."), as the socket's object. */
export function progressFromDebug(text) {
  const found = /step (\d+)\/(\d+) \((\d+)%\)(?:, ([\d.]+) (it\/s|s\/it))?/.exec(text || "");
  if (!found) return null;
  return { stepCurrent: found[1], stepTotal: found[2], percentage: found[3], speed: found[4] || "",
    speedType: found[5] || "", elapsedTime: "", remainingTime: "" };
}

/**
 * Follow a task until it ends: onEvent({type, message, task?}) for each status, progress and the outputs.
 * Returns a handle with stop(). Socket first; if it fails or drops before the end, poll every second.
 */
export function follow(taskid, token, onEvent, onMode) {
  let stopped = false;
  let ended = false;
  let socket = null;
  let timer = null;

  const finish = () => { ended = true; if (socket) socket.close(); };

  const poll = async () => {
    if (stopped || ended) return;
    onMode("polling Task/Detail");
    let lastKey = "";
    const tick = async () => {
      if (stopped || ended) return;
      try {
        const task = (await call("/v1/Task/Detail", { taskid })).tasklist[0];
        const progress = task.status === "task_output" ? progressFromDebug(task.debugoutput) : null;
        const key = `${task.status}:${progress ? progress.stepCurrent : ""}`;
        if (key !== lastKey) {
          lastKey = key;
          const message = task.status === "task_postprocess_end" ? task.outputs : progress;
          onEvent({ type: task.status, message, task });
        }
        if (TERMINAL.includes(task.status)) { finish(); return; }
      } catch (error) {
        onEvent({ type: "error", message: String(error.message || error) });
      }
      timer = setTimeout(tick, 1000);
    };
    tick();
  };

  try {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    socket = new WebSocket(`${scheme}://${location.host}/ws`);
    socket.onopen = () => {
      onMode("live (WebSocket)");
      socket.send(JSON.stringify({ type: "task_info", tasktoken: token }));
    };
    socket.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.result === false) { onEvent({ type: "error", message: event.message }); return; }
      onEvent(event);
      if (TERMINAL.includes(event.type)) finish();
    };
    socket.onclose = () => { socket = null; if (!ended && !stopped) poll(); };
  } catch {
    poll();
  }

  return {
    stop() {
      stopped = true;
      if (socket) socket.close();
      if (timer) clearTimeout(timer);
    },
  };
}
