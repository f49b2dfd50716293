// The chat page: composer (text, images, video), settings, conversation log, streaming answers, grounding.
// State lives in this module; the server only sees OpenAI chat-completions requests.

import { ApiError, describeError, streamChat } from "./api.js";
import { describeRegions, drawRegions, parseGrounding, renderAnswer } from "./grounding.js";
import { MediaError, dataUrlBytes, formatBytes, loadImage, readAsDataURL, sampleVideo } from "./media.js";

const config = JSON.parse(document.getElementById("ivl-config").textContent);
const ENDPOINT = "v1/chat/completions"; // relative: the page works behind a path prefix
const KEY_STORAGE = "ivl.apiKey";

const $ = (id) => document.getElementById(id);
const el = {
  log: $("log"),
  hint: $("empty-hint"),
  form: $("composer"),
  message: $("message"),
  attachments: $("attachments"),
  imageInput: $("image-input"),
  videoInput: $("video-input"),
  send: $("send"),
  stop: $("stop"),
  clear: $("clear"),
  status: $("status"),
  error: $("error"),
  errorText: $("error-text"),
  errorClose: $("error-close"),
  settings: $("settings"),
  maxTiles: $("max-tiles"),
  maxTokens: $("max-tokens"),
  temperature: $("temperature"),
  videoFrames: $("video-frames"),
  systemPrompt: $("system-prompt"),
  forgetKey: $("forget-key"),
  keyDialog: $("key-dialog"),
  keyForm: $("key-form"),
  keyInput: $("api-key"),
  keyReason: $("key-reason"),
  keyCancel: $("key-cancel"),
};

const state = {
  history: [], // OpenAI messages of finished turns (the system prompt is added per request)
  pending: [], // attachments of the next message: {kind: "image"|"video", name, urls, bytes, thumb}
  controller: null, // AbortController of the running request
  apiKey: sessionStorage.getItem(KEY_STORAGE),
  busy: false,
};

// ------------------------------------------------------------------------------------------------ status, errors

function setStatus(text) {
  el.status.textContent = text;
}

function showError(text, focusTarget = null) {
  el.errorText.textContent = text;
  el.error.hidden = false;
  if (focusTarget) focusTarget.focus();
}

function clearError() {
  el.error.hidden = true;
  el.errorText.textContent = "";
}

// ------------------------------------------------------------------------------------------------ settings

function initSettings() {
  $("model-name").textContent = config.model;
  if (config.maxTilesPerImage) {
    el.maxTiles.max = String(config.maxTilesPerImage);
    el.maxTiles.value = String(config.maxTilesPerImage);
  }
  if (config.maxTokens) el.maxTokens.max = String(config.maxTokens);
  if (config.defaultMaxTokens) el.maxTokens.value = String(config.defaultMaxTokens);
  if (config.maxImages) {
    el.videoFrames.max = String(config.maxImages);
    el.videoFrames.value = String(Math.min(8, config.maxImages));
  }
  // desktop shows the settings beside the chat; phones keep them folded
  if (window.matchMedia("(min-width: 900px)").matches) el.settings.open = true;
  el.forgetKey.hidden = !state.apiKey;
}

/** Read a number field; on a bad value show an error naming the field, focus it, and return null. */
function numberSetting(input, { integer }) {
  const name = document.querySelector(`label[for="${input.id}"]`).textContent;
  const value = Number(input.value);
  const min = input.min === "" ? -Infinity : Number(input.min);
  const max = input.max === "" ? Infinity : Number(input.max);
  if (input.value.trim() === "" || !Number.isFinite(value) || (integer && !Number.isInteger(value)) || value < min || value > max) {
    const range = max === Infinity ? `at least ${min}` : `between ${min} and ${max}`;
    if (el.settings.open === false) el.settings.open = true;
    showError(`${name} must be ${integer ? "a whole number " : "a number "}${range}; got "${input.value}".`, input);
    return null;
  }
  return value;
}

function readSettings() {
  const maxTiles = numberSetting(el.maxTiles, { integer: true });
  if (maxTiles === null) return null;
  const maxTokens = numberSetting(el.maxTokens, { integer: true });
  if (maxTokens === null) return null;
  const temperature = numberSetting(el.temperature, { integer: false });
  if (temperature === null) return null;
  return { maxTiles, maxTokens, temperature, system: el.systemPrompt.value.trim() };
}

// ------------------------------------------------------------------------------------------------ attachments

function imagesIn(message) {
  return Array.isArray(message.content) ? message.content.filter((p) => p.type === "image_url").length : 0;
}

function pendingImageCount() {
  return state.pending.reduce((n, a) => n + a.urls.length, 0);
}

function historyBytes() {
  return new TextEncoder().encode(JSON.stringify(state.history)).length;
}

function pendingBytes() {
  return state.pending.reduce((n, a) => n + a.bytes, 0);
}

/** Why `bytes` more (for `name`) would break the server's body limit, or null. */
function sizeProblem(name, bytes, sizeText) {
  if (!config.maxBodyBytes) return null;
  const total = historyBytes() + pendingBytes() + bytes;
  if (total <= config.maxBodyBytes) return null;
  const limit = formatBytes(config.maxBodyBytes);
  if (bytes > config.maxBodyBytes) {
    return `${name} (${sizeText}) is too large: this server accepts requests of at most ${limit}, and images travel base64-encoded (+33%).`;
  }
  return `${name} (${sizeText}) does not fit: with the conversation so far the request would exceed the server's limit of ${limit}. Remove an attachment or clear the conversation.`;
}

function countProblem(adding) {
  if (!config.maxImages) return null;
  const used = state.history.reduce((n, m) => n + imagesIn(m), 0) + pendingImageCount();
  if (used + adding <= config.maxImages) return null;
  return `This server accepts at most ${config.maxImages} images per conversation (video frames count as images); ${used} already attached or sent.`;
}

async function addImage(file) {
  const problem = countProblem(1) ?? sizeProblem(file.name, dataUrlBytes(file), formatBytes(file.size));
  if (problem) throw new MediaError(problem);
  const url = await readAsDataURL(file);
  state.pending.push({ kind: "image", name: file.name || "pasted image", urls: [url], bytes: url.length, thumb: url });
}

async function addVideo(file) {
  if (state.pending.some((a) => a.kind === "video")) {
    throw new MediaError("Only one video per message: remove the attached video first.");
  }
  const wanted = numberSetting(el.videoFrames, { integer: true });
  if (wanted === null) return;
  const room = config.maxImages ? config.maxImages - state.history.reduce((n, m) => n + imagesIn(m), 0) - pendingImageCount() : wanted;
  const count = Math.min(wanted, room);
  if (count < 1) throw new MediaError(countProblem(1) ?? "No room for video frames in this conversation.");
  setStatus(`Sampling ${count} frames from ${file.name}…`);
  const { frames, duration } = await sampleVideo(file, count);
  const bytes = frames.reduce((n, f) => n + f.length, 0);
  const problem = sizeProblem(file.name, bytes, `${count} frames, ${formatBytes(bytes)}`);
  if (problem) throw new MediaError(problem);
  state.pending.push({
    kind: "video",
    name: `${file.name} · ${count} frames of ${duration.toFixed(1)} s`,
    urls: frames,
    bytes,
    thumb: frames[0],
  });
  setStatus(`Added ${count} frames from ${file.name}.`);
}

async function addFiles(files) {
  clearError();
  for (const file of files) {
    try {
      if (file.type.startsWith("video/")) await addVideo(file);
      else if (file.type.startsWith("image/")) await addImage(file);
      else throw new MediaError(`${file.name || "the file"} is not an image or a video (type "${file.type || "unknown"}").`);
    } catch (error) {
      showError(error instanceof MediaError ? error.message : `Cannot add ${file.name}: ${error.message}`);
      break;
    }
  }
  renderAttachments();
}

function renderAttachments() {
  el.attachments.replaceChildren();
  el.attachments.hidden = state.pending.length === 0;
  state.pending.forEach((item, index) => {
    const li = document.createElement("li");
    li.className = `attachment ${item.kind}`;
    const img = document.createElement("img");
    img.src = item.thumb;
    img.alt = item.kind === "video" ? `Video ${item.name}` : `Image ${item.name}`;
    const caption = document.createElement("span");
    caption.className = "attachment-name";
    caption.textContent = item.name;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "icon remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${item.name}`);
    remove.addEventListener("click", () => {
      state.pending.splice(index, 1);
      renderAttachments();
      setStatus(`Removed ${item.name}.`);
      el.message.focus();
    });
    li.append(img, caption, remove);
    el.attachments.append(li);
  });
}

// ------------------------------------------------------------------------------------------------ conversation log

function article(role, label) {
  el.hint.hidden = true;
  const node = document.createElement("article");
  node.className = `message ${role}`;
  node.setAttribute("aria-label", label);
  el.log.append(node);
  return node;
}

function scrollToEnd() {
  el.log.scrollTop = el.log.scrollHeight;
}

function renderUser(text, attachments) {
  const node = article("user", "Your message");
  if (attachments.length) {
    const strip = document.createElement("div");
    strip.className = "thumbs";
    for (const item of attachments) {
      const img = document.createElement("img");
      img.src = item.thumb;
      img.alt = item.kind === "video" ? `Video ${item.name}` : `Image ${item.name}`;
      img.title = item.name;
      strip.append(img);
    }
    node.append(strip);
  }
  if (text) {
    const p = document.createElement("p");
    p.className = "text";
    p.textContent = text;
    node.append(p);
  }
  scrollToEnd();
  return node;
}

function renderAssistant() {
  const node = article("assistant", "Answer");
  node.setAttribute("aria-busy", "true");
  const body = document.createElement("div");
  body.className = "text";
  const meta = document.createElement("p");
  meta.className = "meta";
  meta.textContent = "Generating…";
  node.append(body, meta);
  scrollToEnd();
  return { node, body, meta };
}

/** The most recent still image of the conversation: what grounding boxes refer to. */
function latestImage() {
  for (let i = state.history.length - 1; i >= 0; i--) {
    const m = state.history[i];
    if (m.role !== "user" || !Array.isArray(m.content)) continue;
    const images = m.content.filter((p) => p.type === "image_url" && !p.ivlFrame);
    if (images.length) return images[images.length - 1].image_url.url;
  }
  return null;
}

async function drawGrounding(view, answer) {
  const src = latestImage();
  if (!src || !parseGrounding(answer, 1, 1).length) return;
  const image = await loadImage(src);
  const regions = parseGrounding(answer, image.naturalWidth, image.naturalHeight);
  const figure = document.createElement("figure");
  figure.className = "grounding";
  const canvas = document.createElement("canvas");
  canvas.setAttribute("role", "img");
  const description = describeRegions(regions);
  canvas.setAttribute("aria-label", `The image with ${regions.length} marked region${regions.length === 1 ? "" : "s"}: ${description}`);
  drawRegions(canvas, image, regions);
  const caption = document.createElement("figcaption");
  caption.textContent = `Regions in pixels of the ${image.naturalWidth}×${image.naturalHeight} image: ${description}`;
  figure.append(canvas, caption);
  view.node.insertBefore(figure, view.meta);
  scrollToEnd();
}

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // fall through to the selection-based copy (e.g. permission denied)
    }
  }
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  const ok = document.execCommand("copy");
  area.remove();
  return ok;
}

function addAnswerTools(view, answer) {
  const tools = document.createElement("div");
  tools.className = "tools";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "secondary small copy";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", "Copy this answer");
  copy.addEventListener("click", async () => {
    const ok = await copyText(answer);
    setStatus(ok ? "Copied the answer to the clipboard." : "Copying failed: select the text and copy it by hand.");
    copy.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => (copy.textContent = "Copy"), 1500);
  });
  tools.append(copy);
  view.node.append(tools);
}

// ------------------------------------------------------------------------------------------------ API key

function askForKey(reason) {
  el.keyReason.textContent = reason;
  el.keyInput.value = "";
  return new Promise((resolve) => {
    const done = (value) => {
      el.keyForm.removeEventListener("submit", onSubmit);
      el.keyCancel.removeEventListener("click", onCancel);
      el.keyDialog.removeEventListener("cancel", onCancel);
      if (el.keyDialog.open) el.keyDialog.close();
      resolve(value);
    };
    const onSubmit = (event) => {
      event.preventDefault();
      const value = el.keyInput.value.trim();
      if (!value) {
        el.keyInput.focus();
        return;
      }
      done(value);
    };
    const onCancel = (event) => {
      event.preventDefault();
      done(null);
    };
    el.keyForm.addEventListener("submit", onSubmit);
    el.keyCancel.addEventListener("click", onCancel);
    el.keyDialog.addEventListener("cancel", onCancel);
    el.keyDialog.showModal();
    el.keyInput.focus();
  });
}

function rememberKey(key) {
  state.apiKey = key;
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  el.forgetKey.hidden = !key;
}

// ------------------------------------------------------------------------------------------------ sending

function setBusy(busy) {
  state.busy = busy;
  el.send.disabled = busy;
  el.stop.hidden = !busy;
  el.log.setAttribute("aria-busy", String(busy));
}

function buildUserMessage(text, attachments) {
  if (!attachments.length) return { role: "user", content: text };
  const parts = [];
  for (const item of attachments) {
    for (const url of item.urls) {
      const part = { type: "image_url", image_url: { url } };
      if (item.kind === "video") Object.defineProperty(part, "ivlFrame", { value: true }); // not serialised
      parts.push(part);
    }
  }
  if (text) parts.push({ type: "text", text });
  return { role: "user", content: parts };
}

function requestBody(userMessage, settings) {
  const messages = [...state.history, userMessage];
  if (settings.system) messages.unshift({ role: "system", content: settings.system });
  const body = {
    model: config.model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: settings.maxTokens,
    temperature: settings.temperature,
  };
  if (config.maxTilesPerImage) body.max_tiles = settings.maxTiles; // an ivl extension; other servers may not know it
  return JSON.stringify(body);
}

async function send() {
  if (state.busy) return;
  clearError();
  const text = el.message.value.trim();
  const attachments = [...state.pending];
  if (!text && !attachments.length) {
    showError("Type a question or add an image first.", el.message);
    return;
  }
  const settings = readSettings();
  if (!settings) return;
  const userMessage = buildUserMessage(text, attachments);
  const body = requestBody(userMessage, settings);
  const size = new TextEncoder().encode(body).length;
  if (config.maxBodyBytes && size > config.maxBodyBytes) {
    showError(
      `This request would be ${formatBytes(size)}, above the server's limit of ${formatBytes(config.maxBodyBytes)}. Remove an image or clear the conversation.`,
    );
    return;
  }
  if (config.apiKeyRequired && !state.apiKey) {
    const key = await askForKey("This server requires an API key.");
    if (!key) {
      showError("An API key is needed to talk to this server.", el.message);
      return;
    }
    rememberKey(key);
  }

  el.message.value = "";
  state.pending = [];
  renderAttachments();
  const userNode = renderUser(text, attachments);
  const view = renderAssistant();
  setBusy(true);
  setStatus("Generating…");
  const outcome = await stream(body, view);
  setBusy(false);
  view.node.setAttribute("aria-busy", "false");

  if (outcome.answer || outcome.kind === "done") {
    state.history.push(userMessage, { role: "assistant", content: outcome.answer });
    renderAnswer(view.body, outcome.answer);
    addAnswerTools(view, outcome.answer);
    drawGrounding(view, outcome.answer).catch((error) => showError(`Cannot draw the regions: ${error.message}`));
  }
  if (outcome.kind === "done") {
    const seconds = (performance.now() - outcome.started) / 1000;
    const tokens = outcome.usage ? `${outcome.usage.completion_tokens} tokens in ` : "";
    const cut = outcome.finish === "length" ? " · cut at the max answer tokens" : "";
    view.meta.textContent = `${tokens}${seconds.toFixed(1)} s${cut}`;
    setStatus("Answer complete.");
  } else if (outcome.kind === "stopped") {
    view.meta.textContent = "Stopped.";
    setStatus("Generation stopped.");
    if (!outcome.answer) rollBack(userNode, view, text, attachments);
  } else {
    const message = describeError(outcome.error);
    if (outcome.answer) {
      view.meta.textContent = `Interrupted: ${message}`;
    } else {
      rollBack(userNode, view, text, attachments);
    }
    setStatus("The request failed.");
    showError(message);
  }
}

/** Undo a turn that produced nothing, giving the text and attachments back so the user can fix and resend. */
function rollBack(userNode, view, text, attachments) {
  userNode.remove();
  view.node.remove();
  if (!el.message.value) el.message.value = text;
  state.pending = [...attachments, ...state.pending];
  renderAttachments();
  el.hint.hidden = el.log.querySelector("article") !== null;
}

/** Run one streaming request, rendering deltas as they arrive; handles 401 by asking for the key once. */
async function stream(body, view) {
  const started = performance.now();
  let answer = "";
  let usage = null;
  let finish = null;
  let frame = 0;
  const render = () => {
    frame = 0;
    renderAnswer(view.body, answer);
    scrollToEnd();
  };
  for (let attempt = 0; ; attempt++) {
    state.controller = new AbortController();
    try {
      for await (const chunk of streamChat({ url: ENDPOINT, body, apiKey: state.apiKey, signal: state.controller.signal })) {
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) {
          answer += choice.delta.content;
          view.meta.textContent = "Generating…";
          if (!frame) frame = requestAnimationFrame(render);
        }
        if (choice?.finish_reason) finish = choice.finish_reason;
        if (chunk.usage) usage = chunk.usage;
      }
      if (frame) cancelAnimationFrame(frame);
      render();
      return { kind: "done", answer, usage, finish, started };
    } catch (error) {
      if (frame) cancelAnimationFrame(frame);
      render();
      if (error.name === "AbortError") return { kind: "stopped", answer, started };
      if (error instanceof ApiError && error.status === 401 && !answer && attempt === 0) {
        rememberKey(null);
        const key = await askForKey(`The server refused the key: ${error.message}`);
        if (key) {
          rememberKey(key);
          continue;
        }
      }
      return { kind: "error", answer, error, started };
    } finally {
      state.controller = null;
    }
  }
}

function stop() {
  if (state.controller) state.controller.abort();
}

function clearConversation() {
  stop();
  state.history = [];
  state.pending = [];
  renderAttachments();
  el.log.querySelectorAll("article").forEach((node) => node.remove());
  el.hint.hidden = false;
  clearError();
  setStatus("Conversation cleared.");
  el.message.focus();
}

// ------------------------------------------------------------------------------------------------ wiring

function hasFiles(event) {
  return Array.from(event.dataTransfer?.types ?? []).includes("Files");
}

function wire() {
  el.form.addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  el.message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    } else if (event.key === "Escape" && state.busy) {
      stop();
    }
  });
  el.stop.addEventListener("click", stop);
  el.clear.addEventListener("click", clearConversation);
  el.errorClose.addEventListener("click", () => {
    clearError();
    el.message.focus();
  });
  el.forgetKey.addEventListener("click", () => {
    rememberKey(null);
    setStatus("The API key was forgotten.");
  });
  el.imageInput.addEventListener("change", async () => {
    await addFiles(Array.from(el.imageInput.files));
    el.imageInput.value = "";
  });
  el.videoInput.addEventListener("change", async () => {
    await addFiles(Array.from(el.videoInput.files));
    el.videoInput.value = "";
  });
  // drop anywhere on the page (and never let the browser navigate away to the dropped file)
  document.addEventListener("dragover", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (event.relatedTarget === null) document.body.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    document.body.classList.remove("dragging");
    if (!event.dataTransfer?.files?.length) return;
    event.preventDefault();
    addFiles(Array.from(event.dataTransfer.files));
  });
  document.addEventListener("paste", (event) => {
    const files = Array.from(event.clipboardData?.files ?? []).filter((f) => f.type.startsWith("image/"));
    if (!files.length) return;
    event.preventDefault();
    addFiles(files);
  });
}

initSettings();
wire();
if (config.apiKeyRequired && !state.apiKey) setStatus("This server needs an API key: you will be asked for it when you send.");

// for debugging from the console and for the browser tests
window.ivl = {
  config,
  state,
  parseGrounding,
  streamChat,
  describeError,
  addFiles,
  send,
  // resolves once any running request has finished
  idle: () => new Promise((resolve) => {
    const check = () => (state.busy ? setTimeout(check, 20) : resolve());
    check();
  }),
};
document.documentElement.dataset.ready = "true";
