// The HyperGen playground: plain calls to the server's OpenAI-compatible API, no framework.
"use strict";

// Relative to the page, so it also works when the server sits behind a path prefix.
const API = new URL("../v1/", location.href);
// Previews per generation; each is one decode of a half-size latent (a few % of the run).
const PARTIAL_IMAGES = 3;
const KEY_STORAGE = "hypergen-api-key";
// Client-side random seeds are recorded with each image, so "reuse" reproduces it exactly.
const RANDOM_SEEDS = 2 ** 32;
const MASK_COLOUR = "rgb(255, 0, 170)";

const $ = (id) => document.getElementById(id);

// --- API key and the model and LoRA pickers ------------------------------------------------------

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function isAuthError(error) {
  return error && (error.code === "missing_api_key" || error.code === "invalid_api_key");
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.message) return body.error.message;
  } catch {
    // not JSON: fall through to the status line
  }
  return `The server answered ${response.status} ${response.statusText}.`;
}

function showKeyForm(message) {
  $("key-form").hidden = false;
  $("key-message").textContent = message;
}

function selectIfListed(select, value) {
  if ([...select.options].some((option) => option.value === value)) select.value = value;
}

function fillSelect(select, options) {
  const kept = select.value;
  select.replaceChildren(...options.map(([value, label]) => new Option(label, value)));
  selectIfListed(select, kept);
}

async function getJson(path) {
  const response = await fetch(new URL(path, API), { headers: authHeaders() });
  return { response, body: response.ok ? await response.json() : null };
}

/** Fill the model picker; a 401 asks for a key (or says why the stored one failed). */
async function loadModels() {
  $("page-error").textContent = "";
  let reply;
  try {
    reply = await getJson("models");
  } catch {
    $("page-error").textContent = "The server cannot be reached.";
    return;
  }
  if (reply.response.status === 401) {
    if (apiKey()) {
      sessionStorage.removeItem(KEY_STORAGE);
      showKeyForm(await errorMessage(reply.response));
    } else {
      showKeyForm("This server needs an API key.");
    }
    return;
  }
  if (!reply.response.ok) {
    $("page-error").textContent = await errorMessage(reply.response);
    return;
  }
  models = new Map(reply.body.data.map((model) => [model.id, model]));
  fillSelect($("model"), reply.body.data.map((model) => [model.id, model.id]));
  applyModel();
  if (apiKey()) showKeyForm("Key accepted. It is kept in this browser tab only.");
  await loadLoras();
}

let models = new Map(); // id → the model's card from /v1/models (sizes, schedulers once loaded)
const SQUARE_SIDES = [64, 128, 256, 512, 768, 1024, 1536, 2048];

/** Offer the sizes and schedulers the chosen model accepts (its card says, once it is loaded). */
function applyModel() {
  const card = models.get($("model").value);
  if (!card || !card.max_size) return;
  const largest = Number(card.max_size.split("x")[0]);
  const sizes = [card.native_size, ...SQUARE_SIDES.filter((side) => side <= largest).map((side) => `${side}x${side}`)];
  $("sizes").replaceChildren(...[...new Set(sizes)].map((size) => new Option("", size)));
  const [width, height] = $("size").value.split("x").map(Number);
  if (!(width <= largest && height <= largest)) $("size").value = card.native_size;
  fillSelect($("scheduler"), [["", "model's own"], ...(card.schedulers || []).map((name) => [name, name])]);
}

async function loadLoras() {
  try {
    const reply = await getJson("loras");
    // Not ready yet (503) or unreachable: the picker keeps "none".
    if (reply.body) fillSelect($("lora"), [["", "none"], ...reply.body.data.map((lora) => [lora.name, lora.name])]);
  } catch {
    // as above
  }
}

// --- tabs ----------------------------------------------------------------------------------------

const TABS = ["tab-generate", "tab-edit"];

function selectTab(tabId, focus = false) {
  for (const id of TABS) {
    const selected = id === tabId;
    $(id).setAttribute("aria-selected", String(selected));
    $(id).tabIndex = selected ? 0 : -1;
    $($(id).getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) $(tabId).focus();
}

function onTabKey(event) {
  const index = TABS.indexOf(event.target.id);
  const moves = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: TABS.length - 1 };
  if (!(event.key in moves)) return;
  event.preventDefault();
  selectTab(TABS[(moves[event.key] + TABS.length) % TABS.length], true);
}

// --- shared helpers ------------------------------------------------------------------------------

function optionalNumber(input) {
  return input.value.trim() === "" ? undefined : Number(input.value);
}

function randomSeed() {
  return Math.floor(Math.random() * RANDOM_SEEDS);
}

function imageUrl(b64, format = "png") {
  return `data:image/${format};base64,${b64}`;
}

function dataUrlToBlob(url) {
  const [header, b64] = url.split(",");
  const bytes = Uint8Array.from(atob(b64), (char) => char.charCodeAt(0));
  return new Blob([bytes], { type: header.slice(5, header.indexOf(";")) });
}

function seconds(since) {
  return ((performance.now() - since) / 1000).toFixed(1);
}

/** A result card: the image (a button when `onReuse` is given), its settings and actions. */
function imageCard({ url, alt, details, fileName, onReuse, onEdit }) {
  const item = document.createElement("li");
  item.className = "card";
  const image = document.createElement("img");
  image.className = "pixelated";
  image.src = url;
  if (onReuse) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "image-button";
    button.title = "Reuse these settings";
    button.setAttribute("aria-label", `Reuse the settings of: ${alt}`);
    image.alt = "";
    button.append(image);
    button.addEventListener("click", onReuse);
    item.append(button);
  } else {
    image.alt = alt;
    item.append(image);
  }
  const list = document.createElement("dl");
  for (const [label, value] of details) {
    if (value === undefined || value === "") continue;
    const term = document.createElement("dt");
    const description = document.createElement("dd");
    term.textContent = label;
    description.textContent = String(value);
    list.append(term, description);
  }
  const actions = document.createElement("div");
  actions.className = "card-actions";
  const download = document.createElement("a");
  download.href = url;
  download.download = fileName;
  download.textContent = "Download";
  const edit = document.createElement("button");
  edit.type = "button";
  edit.textContent = "Edit";
  edit.setAttribute("aria-label", `Edit this image: ${alt}`);
  edit.addEventListener("click", onEdit);
  actions.append(download, edit);
  item.append(list, actions);
  return item;
}

// --- generation over the WebSocket ---------------------------------------------------------------

let run = null; // the generation in progress: its socket, settings and what has arrived

function generationSettings() {
  const lora = $("lora").value;
  return {
    prompt: $("prompt").value.trim(),
    negative_prompt: $("negative-prompt").value.trim() || undefined,
    model: $("model").value || undefined,
    size: $("size").value.trim(),
    n: Number($("n").value),
    num_inference_steps: optionalNumber($("steps")),
    guidance_scale: optionalNumber($("guidance")),
    seed: optionalNumber($("seed")) ?? randomSeed(),
    lora_path: lora || undefined,
    lora_scale: lora ? optionalNumber($("lora-scale")) : undefined,
    scheduler: $("scheduler").value || undefined,
  };
}

function openSocket() {
  const url = new URL("images/ws", API);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  const key = apiKey();
  // Browsers cannot set headers on a WebSocket: the key goes as a subprotocol the server never echoes.
  return new WebSocket(url, key ? ["hypergen", `openai-insecure-api-key.${key}`] : ["hypergen"]);
}

function setRunning(running) {
  $("generate").disabled = running;
  $("cancel").disabled = !running;
  $("panel-generate").setAttribute("aria-busy", String(running));
}

function setProgress(step, total) {
  $("progress").max = total;
  $("progress").value = step;
  $("status").textContent = `Step ${step}/${total}`;
}

function showPreview(url) {
  $("preview").src = url;
  $("preview").hidden = false;
}

function generate(event) {
  event.preventDefault();
  if (run) return;
  const settings = generationSettings();
  $("generate-error").textContent = "";
  let socket;
  try {
    socket = openSocket();
  } catch {
    $("generate-error").textContent = "This API key has characters a WebSocket subprotocol cannot carry.";
    return;
  }
  const current = { socket, settings, images: 0, totalSteps: 0, failed: false, cancelled: false, startedAt: performance.now() };
  run = current;
  setRunning(true);
  $("progress").value = 0;
  $("status").textContent = "Connecting…";
  socket.onopen = () => socket.send(JSON.stringify({ ...settings, partial_images: PARTIAL_IMAGES }));
  socket.onmessage = (message) => onGenerationEvent(current, JSON.parse(message.data));
  socket.onclose = () => finishGeneration(current);
}

function onGenerationEvent(current, event) {
  switch (event.type) {
    case "queued":
      $("status").textContent =
        event.position > 0
          ? `In the queue: position ${event.position}, about ${Math.ceil(event.estimated_wait_s)} s`
          : "Starting…";
      break;
    case "started":
      current.totalSteps = event.total_steps;
      setProgress(0, event.total_steps);
      break;
    case "progress":
      setProgress(event.step, event.total_steps);
      break;
    case "image_generation.partial_image":
      showPreview(imageUrl(event.b64_json, event.output_format));
      break;
    case "image_generation.completed": {
      const url = imageUrl(event.b64_json, event.output_format);
      showPreview(url);
      addToGallery(url, current, event.image_index ?? 0);
      current.images += 1;
      break;
    }
    case "error":
      current.failed = true;
      $("generate-error").textContent = event.error.message;
      if (isAuthError(event.error)) showKeyForm(event.error.message);
      break;
  }
}

/** Closing the socket is the cancel: the server frees the queue slot and stops the job. */
function cancelGeneration() {
  if (!run) return;
  run.cancelled = true;
  run.socket.close();
  finishGeneration(run);
}

function finishGeneration(current) {
  if (run !== current) return;
  run = null;
  setRunning(false);
  const wanted = current.settings.n;
  if (current.cancelled) {
    $("status").textContent = "Cancelled.";
  } else if (current.failed) {
    $("status").textContent = "";
  } else if (current.images < wanted) {
    $("generate-error").textContent = "The connection closed before the images were finished.";
  } else {
    const steps = `${current.totalSteps}/${current.totalSteps} steps`;
    $("status").textContent = `Done: ${steps}, ${wanted} image${wanted > 1 ? "s" : ""} in ${seconds(current.startedAt)} s.`;
  }
}

function addToGallery(url, current, imageIndex) {
  const settings = {
    ...current.settings,
    n: 1,
    seed: current.settings.seed + imageIndex, // image i of a request uses seed + i
    num_inference_steps: current.settings.num_inference_steps ?? current.totalSteps,
  };
  const card = imageCard({
    url,
    alt: `${settings.prompt}, seed ${settings.seed}`,
    details: [
      ["Prompt", settings.prompt],
      ["Negative", settings.negative_prompt],
      ["Seed", settings.seed],
      ["Steps", settings.num_inference_steps],
      ["Guidance", settings.guidance_scale ?? "model default"],
      ["Size", settings.size],
      ["Model", settings.model],
      ["LoRA", settings.lora_path && `${settings.lora_path} × ${settings.lora_scale ?? "default"}`],
      ["Scheduler", settings.scheduler ?? "model's own"],
    ],
    fileName: `hypergen-${settings.seed}.png`,
    onReuse: () => reuseSettings(settings),
    onEdit: () => editImage(url),
  });
  $("gallery-empty").hidden = true;
  $("gallery").prepend(card);
}

function reuseSettings(settings) {
  const fields = {
    prompt: settings.prompt,
    "negative-prompt": settings.negative_prompt,
    steps: settings.num_inference_steps,
    guidance: settings.guidance_scale,
    seed: settings.seed,
    size: settings.size,
    n: settings.n,
    "lora-scale": settings.lora_scale,
  };
  for (const [id, value] of Object.entries(fields)) $(id).value = value ?? "";
  selectIfListed($("model"), settings.model);
  applyModel();
  selectIfListed($("lora"), settings.lora_path ?? "");
  selectIfListed($("scheduler"), settings.scheduler ?? "");
  selectTab("tab-generate");
  $("prompt").focus();
}

// --- edits: an uploaded image, a painted mask, multipart POST /v1/images/edits ------------------

const editor = { source: null, painted: false, last: null, request: null };

async function loadEditImage(blob) {
  $("edit-error").textContent = "";
  let bitmap;
  try {
    bitmap = await createImageBitmap(blob);
  } catch {
    $("edit-error").textContent = "The browser cannot read this file as an image.";
    return;
  }
  editor.source = blob;
  // Both canvases work at the image's own size, so the mask matches it pixel for pixel.
  for (const canvas of [$("edit-canvas"), $("mask-canvas")]) {
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
  }
  $("edit-canvas").getContext("2d").drawImage(bitmap, 0, 0);
  clearMask();
  $("canvas-stack").hidden = false;
}

function editImage(url) {
  $("edit-image").value = "";
  loadEditImage(dataUrlToBlob(url));
  selectTab("tab-edit");
  $("edit-prompt").focus();
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  editor.painted = false;
}

function canvasPoint(event) {
  const canvas = $("mask-canvas");
  const box = canvas.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left) * canvas.width) / box.width,
    y: ((event.clientY - box.top) * canvas.height) / box.height,
  };
}

function paintTo(point) {
  const canvas = $("mask-canvas");
  const context = canvas.getContext("2d");
  const width = Math.max(1, (Number($("brush").value) / 100) * Math.min(canvas.width, canvas.height));
  context.strokeStyle = context.fillStyle = MASK_COLOUR;
  context.lineWidth = width;
  context.lineCap = context.lineJoin = "round";
  context.beginPath();
  context.moveTo(editor.last.x, editor.last.y);
  context.lineTo(point.x, point.y);
  context.stroke();
  // A click without a drag is a zero-length line, which canvas does not draw: add the dot.
  context.beginPath();
  context.arc(point.x, point.y, width / 2, 0, 2 * Math.PI);
  context.fill();
  editor.last = point;
  editor.painted = true;
}

function startPainting(event) {
  if (!editor.source) return;
  event.currentTarget.setPointerCapture(event.pointerId);
  editor.last = canvasPoint(event);
  paintTo(editor.last);
}

function keepPainting(event) {
  if (editor.last) paintTo(canvasPoint(event));
}

function stopPainting() {
  editor.last = null;
}

/** OpenAI's mask: a PNG of the image's size, fully transparent where painted (= edit), opaque elsewhere. */
function maskBlob() {
  const painted = $("mask-canvas");
  const { width, height } = painted;
  const paint = painted.getContext("2d").getImageData(0, 0, width, height).data;
  const out = document.createElement("canvas");
  out.width = width;
  out.height = height;
  const context = out.getContext("2d");
  const mask = context.createImageData(width, height);
  for (let alpha = 3; alpha < paint.length; alpha += 4) mask.data[alpha] = paint[alpha] >= 128 ? 0 : 255;
  context.putImageData(mask, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

function setEditing(editing) {
  $("edit").disabled = editing;
  $("edit-cancel").disabled = !editing;
  $("panel-edit").setAttribute("aria-busy", String(editing));
}

async function submitEdit(event) {
  event.preventDefault();
  if (editor.request) return;
  $("edit-error").textContent = "";
  if (!editor.source) {
    $("edit-error").textContent = "Choose an image first.";
    return;
  }
  const seed = optionalNumber($("edit-seed")) ?? randomSeed();
  const fields = {
    prompt: $("edit-prompt").value.trim(),
    model: $("model").value,
    n: $("edit-n").value,
    size: $("edit-size").value.trim(),
    seed: String(seed),
    num_inference_steps: $("edit-steps").value.trim(),
    guidance_scale: $("edit-guidance").value.trim(),
    response_format: "b64_json",
  };
  const form = new FormData();
  form.append("image", editor.source, editor.source.name || "image.png");
  if (editor.painted) form.append("mask", await maskBlob(), "mask.png");
  for (const [name, value] of Object.entries(fields)) if (value !== "") form.append(name, value);
  editor.request = new AbortController();
  setEditing(true);
  const startedAt = performance.now();
  $("edit-status").textContent = editor.painted ? "Inpainting…" : "Editing…";
  try {
    const response = await fetch(new URL("images/edits", API), {
      method: "POST",
      body: form,
      headers: authHeaders(),
      signal: editor.request.signal,
    });
    if (!response.ok) {
      const message = await errorMessage(response);
      $("edit-status").textContent = "";
      $("edit-error").textContent = message;
      if (response.status === 401) showKeyForm(message);
      return;
    }
    const body = await response.json();
    body.data.forEach((item, index) => addEditResult(imageUrl(item.b64_json, body.output_format), fields.prompt, seed + index));
    $("edit-status").textContent = `Done: ${body.data.length} image${body.data.length > 1 ? "s" : ""} in ${seconds(startedAt)} s.`;
  } catch (error) {
    $("edit-status").textContent = error.name === "AbortError" ? "Cancelled." : "";
    if (error.name !== "AbortError") $("edit-error").textContent = "The server cannot be reached.";
  } finally {
    editor.request = null;
    setEditing(false);
  }
}

function addEditResult(url, prompt, seed) {
  const card = imageCard({
    url,
    alt: `Edited: ${prompt}, seed ${seed}`,
    details: [["Prompt", prompt], ["Seed", seed]],
    fileName: `hypergen-edit-${seed}.png`,
    onEdit: () => editImage(url),
  });
  $("edit-results").prepend(card);
}

// --- wiring --------------------------------------------------------------------------------------

function start() {
  for (const id of TABS) {
    $(id).addEventListener("click", () => selectTab(id));
    $(id).addEventListener("keydown", onTabKey);
  }
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("key-message").textContent = "Checking the key…";
    loadModels();
  });
  $("generate-form").addEventListener("submit", generate);
  $("model").addEventListener("change", applyModel);
  $("cancel").addEventListener("click", cancelGeneration);
  $("edit-form").addEventListener("submit", submitEdit);
  $("edit-cancel").addEventListener("click", () => editor.request && editor.request.abort());
  $("edit-image").addEventListener("change", (event) => {
    if (event.target.files[0]) loadEditImage(event.target.files[0]);
  });
  $("clear-mask").addEventListener("click", clearMask);
  const mask = $("mask-canvas");
  mask.addEventListener("pointerdown", startPainting);
  mask.addEventListener("pointermove", keepPainting);
  mask.addEventListener("pointerup", stopPainting);
  mask.addEventListener("pointercancel", stopPainting);
  $("api-key").value = apiKey();
  loadModels();
}

start();
