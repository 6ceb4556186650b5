// The playground page: a picker of the served tools (Tool/List), the chosen tool's inputs with its own defaults
// (Tool/Detail), an image upload, Run on that tool's route, live status and progress, the video, Kill/Cancel, and
// the recent tasks. Everything goes through the public API.

import { call, follow, setCredentials, SLUG, TERMINAL } from "./api.js";

const $ = (id) => document.getElementById(id);
const RUNNING = ["task_accept", "task_preprocess_start", "task_preprocess_end", "task_assign", "task_start",
  "task_output", "task_output_full", "task_end", "task_postprocess_start"];

const state = { items: [], tool: SLUG, current: null, follower: null, lastStatus: "" };

function say(text, kind = "") {
  $("message").textContent = text;
  $("message").className = kind;
}

// --- the form, built from Tool/Detail ------------------------------------------------------------------

function fieldFor(item) {
  const wide = item.type === "textarea" || item.id === "inputImageUrl";
  const label = document.createElement("label");
  label.className = wide ? "wide" : "";
  label.append(item.id === "inputImageUrl" ? "inputImageUrl (or drop an image above)" : item.id);
  const input = document.createElement(item.type === "textarea" ? "textarea" : "input");
  input.id = `in-${item.id}`;
  input.name = item.id;
  if (item.type === "number" || item.type === "float") {
    input.type = "number";
    for (const limit of ["min", "max", "step"]) if (item[limit] !== undefined) input[limit] = item[limit];
    if (item.type === "float") input.step = "any";
  } else if (input.tagName === "INPUT") {
    input.type = "text";
  }
  input.value = item.default ?? "";
  input.placeholder = item.default ? "" : (item.description || "");
  label.append(input);
  const hint = document.createElement("span");
  hint.className = "hint";
  hint.textContent = [item.description, item.note].filter(Boolean).join("; ");
  label.append(hint);
  return label;
}

function buildForm(tool) {
  // The file input (inputImage) is the drop zone above; the form holds the other inputs.
  state.items = tool.parameters.flatMap((group) => group.items).filter((item) => item.type !== "fileinput");
  $("fields").replaceChildren(...state.items.map(fieldFor));
  const examples = $("examples");
  examples.replaceChildren(examples.options[0]);
  const seen = new Set();
  (tool.inspire || []).forEach((example, index) => {
    if (!example.prompt || seen.has(example.prompt)) return;
    seen.add(example.prompt);
    const option = new Option(example.prompt.length > 90 ? `${example.prompt.slice(0, 87)}…` : example.prompt,
      String(index));
    option.title = example.prompt;
    examples.append(option);
  });
  examples.onchange = () => {
    // An example sets the inputs it names (prompt, and for some negativePrompt, steps, seed); the rest keep theirs.
    const example = tool.inspire[Number(examples.value)];
    if (!example) return;
    for (const item of state.items) {
      if (item.id !== "inputImageUrl" && example[item.id] !== undefined) $(`in-${item.id}`).value = example[item.id];
    }
  };
  $("reset").onclick = () => state.items.forEach((item) => {
    if (item.id !== "inputImageUrl") $(`in-${item.id}`).value = item.default ?? "";
  });
  $("run").disabled = false;
}

const slugOf = (tool) => `${tool.slugowner}/${tool.slugproject}`;

async function loadTool(slug) {
  // The form is rebuilt with this tool's own defaults and examples; the image (a URL) is kept.
  const image = $("in-inputImageUrl") ? $("in-inputImageUrl").value : "";
  const tool = (await call("/v1/Tool/Detail", slug)).tool[0];
  state.tool = { slugowner: tool.slugowner, slugproject: tool.slugproject };
  buildForm(tool);
  $("in-inputImageUrl").value = image;
  $("tool-about").textContent = tool.description || "";
}

async function loadTools() {
  // Every tool this server runs (the catalogue, codexq/Particalize first): one Run route each.
  const tools = (await call("/v1/Tool/List", { start: "0", limit: "100", search: "", categories: [] })).tool;
  const picker = $("tool");
  picker.replaceChildren(...tools.map((tool) => {
    const option = new Option(slugOf(tool), slugOf(tool));
    option.title = tool.title;
    return option;
  }));
  picker.value = slugOf(state.tool);
  picker.onchange = async () => {
    const [slugowner, slugproject] = picker.value.split("/");
    picker.disabled = true;
    try {
      await loadTool({ slugowner, slugproject });
      say("");
    } catch (error) {
      say(error.message, "bad");
    } finally {
      picker.disabled = false;
    }
  };
  await loadTool(state.tool);
}

// --- the input image -----------------------------------------------------------------------------------

async function useImage(file) {
  if (!file) return;
  const preview = $("image-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("upload-state").textContent = `uploading ${file.name}…`;
  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const uploaded = (await call("/v1/File/Upload", form)).list[0];
    $("in-inputImageUrl").value = uploaded.url;
    $("upload-state").textContent = `uploaded ${uploaded.name} (${uploaded.size} bytes)`;
  } catch (error) {
    $("upload-state").textContent = `upload refused: ${error.message}`;
  }
}

function wireImage() {
  const drop = $("drop");
  $("image-file").onchange = (event) => useImage(event.target.files[0]);
  drop.ondragover = (event) => { event.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    useImage(event.dataTransfer.files[0]);
  };
}

// --- running and following a task ------------------------------------------------------------------------

async function run(event) {
  event.preventDefault();
  const body = {};
  for (const item of state.items) {
    const value = $(`in-${item.id}`).value.trim();
    if (value !== "") body[item.id] = value;
  }
  if (!body.inputImageUrl) { say("Pick or drop an image first (or give an inputImageUrl).", "bad"); return; }
  $("run").disabled = true;
  try {
    const answer = await call(`/v1/Run/${state.tool.slugowner}/${state.tool.slugproject}`, body);
    say("");
    watch(answer.taskid, answer.socketaccesstoken);
  } catch (error) {
    say(error.message, "bad");
  } finally {
    $("run").disabled = false;
  }
}

function setControls(status) {
  $("cancel").disabled = status !== "task_queue";
  $("kill").disabled = !RUNNING.includes(status);
}

function watch(taskid, token) {
  if (state.follower) state.follower.stop();
  state.current = { taskid, token };
  state.lastStatus = "";
  $("task-id").textContent = `#${taskid}`;
  $("task-status").textContent = "connecting";
  $("outcome").textContent = "";
  $("progress").value = 0;
  $("progress-text").textContent = "";
  $("events").replaceChildren();
  $("video").hidden = true;
  $("video").removeAttribute("src");
  $("download").hidden = true;
  setControls("");
  state.follower = follow(taskid, token, (event) => onEvent(taskid, event), (mode) => {
    $("live-mode").textContent = mode;
  });
}

function logEvent(event) {
  const line = document.createElement("li");
  let detail = "";
  if (event.type === "task_output" && event.message && typeof event.message === "object") {
    detail = ` step ${event.message.stepCurrent}/${event.message.stepTotal}`;
  } else if (typeof event.message === "string") {
    detail = ` ${event.message}`;
  }
  line.textContent = `${new Date().toLocaleTimeString()} ${event.type}${detail}`;
  line.dataset.type = event.type;
  $("events").append(line);
}

function showProgress(p) {
  $("progress").value = Number(p.percentage) || 0;
  const parts = [`step ${p.stepCurrent}/${p.stepTotal}`, `${p.percentage}%`];
  if (p.speed) parts.push(`${p.speed} ${p.speedType}`);
  if (p.elapsedTime) parts.push(`${p.elapsedTime} elapsed`);
  if (p.remainingTime) parts.push(`${p.remainingTime} left`);
  $("progress-text").textContent = parts.join(" · ");
}

function showVideo(output) {
  const video = $("video");
  video.src = output.url;
  video.hidden = false;
  const link = $("download");
  link.href = output.url;
  link.download = output.name;
  link.textContent = `Download ${output.name} (${output.size} bytes)`;
  link.hidden = false;
}

async function onEvent(taskid, event) {
  if (!state.current || state.current.taskid !== taskid) return;
  if (event.type === "error") { say(event.message, "bad"); return; }
  logEvent(event);
  $("task-status").textContent = event.type;
  setControls(event.type);
  if (event.type === "task_output" && event.message && typeof event.message === "object") showProgress(event.message);
  if (event.type !== state.lastStatus) {
    // A new status (not another step): the recent list and the queue line change with it.
    state.lastStatus = event.type;
    refreshTasks();
    refreshServer();
  }
  if (!TERMINAL.includes(event.type)) return;
  const outcome = $("outcome");
  if (event.type === "task_cancel") {
    outcome.textContent = "cancelled";
    outcome.className = "warn";
  } else {
    const outputs = Array.isArray(event.message) ? event.message : [];
    if (outputs.length) {
      outcome.textContent = "succeeded";
      outcome.className = "ok";
      // Success means every step ran; a poll can miss the last step's report, so the bar says so here.
      $("progress").value = 100;
      if (!$("progress-text").textContent) $("progress-text").textContent = "all steps done";
      showVideo(outputs[0]);
    } else {
      const task = event.task || (await call("/v1/Task/Detail", { taskid })).tasklist[0];
      outcome.textContent = `failed: ${task.debugerror || `pexit ${task.pexit}`}`;
      outcome.className = "bad";
    }
  }
}

async function control(route) {
  if (!state.current) return;
  try {
    const task = (await call(route, { taskid: state.current.taskid })).tasklist[0];
    say(`${route.split("/").pop()}: task ${task.id} is ${task.status}.`);
  } catch (error) {
    say(error.message, "bad");
  }
}

// --- recent tasks and the server's state -------------------------------------------------------------------

function outcomeOf(task) {
  if (task.status === "task_cancel") return ["cancelled", "warn"];
  if (task.status === "task_postprocess_end") return task.pexit === "0" ? ["succeeded", "ok"] : ["failed", "bad"];
  return [task.status, ""];
}

let listRequests = 0;

async function refreshTasks() {
  const mine = ++listRequests;
  let list;
  try {
    list = (await call("/v1/Task/List", { start: "0", limit: "20" })).tasklist;
  } catch (error) {
    say(error.message, "bad");
    return;
  }
  if (mine !== listRequests) return; // a later refresh was asked for; its answer is the newer one
  const rows = list.map((task) => {
    const p = task.parameters || {};
    const row = document.createElement("tr");
    row.dataset.taskid = task.id;
    const [text, kind] = outcomeOf(task);
    const cells = [task.id, `${task.modelslugowner}/${task.modelslugproject}`, text, new Date(Number(task.createtime) * 1000).toLocaleString(),
      `${p.width || "?"}x${p.height || "?"}, ${p.numFrames || "81"} frames`, p.steps || "30"];
    cells.forEach((value, i) => {
      const cell = document.createElement("td");
      cell.textContent = value;
      if (i === 2) cell.className = `task-state ${kind}`;
      row.append(cell);
    });
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = "Open";
    open.onclick = () => watch(task.id, task.socketaccesstoken);
    const cell = document.createElement("td");
    cell.append(open);
    row.append(cell);
    return row;
  });
  if (!rows.length) {
    const row = document.createElement("tr");
    const cell = document.createElement("td");
    cell.colSpan = 7;
    cell.className = "muted";
    cell.textContent = "No tasks yet.";
    row.append(cell);
    rows.push(row);
  }
  $("tasks").tBodies[0].replaceChildren(...rows);
}

async function refreshServer() {
  try {
    const health = await (await fetch("/healthz")).json();
    const workers = health.workers.map((w) => `${w.id} ${w.state}`).join(", ") || "no workers";
    $("server-state").textContent = `queue ${health.queued} · ${workers}`;
  } catch {
    $("server-state").textContent = "server unreachable";
  }
}

// --- start ---------------------------------------------------------------------------------------------------

async function start() {
  wireImage();
  $("run-form").onsubmit = run;
  $("kill").onclick = () => control("/v1/Task/Kill");
  $("cancel").onclick = () => control("/v1/Task/Cancel");
  $("refresh").onclick = refreshTasks;
  refreshServer();
  setInterval(refreshServer, 5000);
  const config = await (await fetch("/playground/config.json")).json();
  const ready = async () => {
    try {
      await loadTools();
      await refreshTasks();
      say("");
      document.body.dataset.ready = "1";
    } catch (error) {
      say(error.message, "bad");
    }
  };
  if (config.authRequired) {
    $("auth").hidden = false;
    say("Enter an API key (and its secret) to use this server.", "warn");
    $("auth").onsubmit = (event) => {
      event.preventDefault();
      setCredentials($("api-key").value, $("api-secret").value);
      ready();
    };
  } else {
    await ready();
  }
}

start();
