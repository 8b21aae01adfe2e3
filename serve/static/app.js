// The page's behaviour: load the models, take an image (picker, camera, drop, paste), ask the server,
// draw the answer. No libraries, no build step; every request goes to this server (relative URLs, so
// the page also works behind a reverse proxy under a path prefix).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const main = $("main");
  const modelSelect = $("model");
  const topkInput = $("topk");
  const modelInfo = $("model-info");
  const fileInput = $("file");
  const cameraInput = $("camera");
  const dropzone = $("dropzone");
  const preview = $("preview");
  const noPreview = $("no-preview");
  const dropHint = $("drop-hint");
  const fileInfo = $("file-info");
  const statusLine = $("status");
  const errorBox = $("error");
  const errorMessage = $("error-message");
  const errorDetail = $("error-detail");
  const results = $("results");
  const latency = $("latency");
  const overlay = $("overlay");
  const summary = $("summary");
  const topkField = $("topk-field");
  // Distinct colours for classes and boxes (Tableau 10).
  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

  let models = [];
  let currentFile = null;
  let previewUrl = null;
  let requestSeq = 0;
  let inFlight = null;

  // ---- API key: asked for only when the server answers 401; kept in this tab (sessionStorage) ----

  const KEY_STORE = "torch-serve.api-key";
  const keyForm = $("key-form");
  const keyInput = $("api-key");
  const keyNote = $("key-note");
  let afterKey = null;

  // fetch() with the key, if one was given, as X-API-Key.
  function api(url, options = {}) {
    const headers = new Headers(options.headers || {});
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) headers.set("X-API-Key", key);
    return fetch(url, { ...options, headers });
  }

  // Show the key field; `retry` runs once a key is entered. Returns true if the answer was a 401.
  function askedForKey(response, retry) {
    if (response.status !== 401) return false;
    const refused = sessionStorage.getItem(KEY_STORE) !== null;
    sessionStorage.removeItem(KEY_STORE);
    keyNote.textContent = refused
      ? "The server did not accept that key. Enter another one."
      : "This server needs an API key. It is kept in this browser tab only.";
    keyForm.hidden = false;
    keyInput.focus();
    afterKey = retry;
    setState("idle", "Waiting for an API key.");
    return true;
  }

  keyForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const key = keyInput.value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    keyInput.value = "";
    keyForm.hidden = true;
    const retry = afterKey;
    afterKey = null;
    if (retry) retry();
  });

  function percent(p) {
    const pct = p * 100;
    if (pct >= 1) return pct.toFixed(1) + "%";
    return pct >= 0.005 ? pct.toFixed(2) + "%" : "<0.01%";
  }

  function formatBytes(n) {
    if (n < 1024) return n + " B";
    if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KB";
    return (n / 1024 / 1024).toFixed(1) + " MB";
  }

  function formatMs(ms) {
    return ms < 10 ? ms.toFixed(1) + " ms" : Math.round(ms) + " ms";
  }

  function setState(state, text) {
    main.dataset.state = state;
    main.setAttribute("aria-busy", state === "loading" ? "true" : "false");
    statusLine.textContent = text || "";
    statusLine.hidden = !text;
  }

  function showError(message, detail) {
    errorMessage.textContent = message;
    errorDetail.textContent = detail || "";
    errorDetail.hidden = !detail;
    errorBox.hidden = false;
    results.hidden = true;
    results.replaceChildren();
    latency.hidden = true;
  }

  function clearError() {
    errorBox.hidden = true;
    errorMessage.textContent = "";
    errorDetail.textContent = "";
  }

  // Errors from the API always read {"error": {"code", "message"}}; anything else gets words too.
  async function readError(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      /* not JSON: a proxy's HTML page, say */
    }
    const err = body && body.error;
    if (err && err.message) {
      const message = err.message.charAt(0).toUpperCase() + err.message.slice(1);
      return { message, detail: `${err.code || "error"} · HTTP ${response.status}` };
    }
    return {
      message: `The server answered HTTP ${response.status} ${response.statusText || ""}`.trim() + ".",
      detail: "",
    };
  }

  // ---- models ----------------------------------------------------------------------------------

  function taskOf(m) {
    return (m && m.task && m.task.name) || "classify";
  }

  function describeModel(m) {
    if (!m) return "";
    const parts = [taskOf(m)];
    if (m.num_classes) parts.push(`${m.num_classes.toLocaleString()} classes`);
    if (m.task && m.task.dim) parts.push(`${m.task.dim} dimensions`);
    if (m.input && m.input.shape) parts.push(`input ${m.input.shape.join("×")}`);
    if (m.device) parts.push(`on ${m.device}`);
    if (m.ready === false) parts.push("still loading");
    return parts.join(" · ");
  }

  function selectedModel() {
    return models.find((m) => m.name === modelSelect.value);
  }

  function onModelChange() {
    const m = selectedModel();
    modelInfo.textContent = describeModel(m);
    modelInfo.title = m ? m.architecture : "";
    if (m) {
      topkInput.max = String(m.num_classes || 100);
      topkInput.value = String(m.topk || 5);
      topkField.hidden = taskOf(m) !== "classify";
    }
    if (currentFile) classify(currentFile);
  }

  async function loadModels() {
    try {
      const response = await api("models", { headers: { Accept: "application/json" } });
      if (askedForKey(response, loadModels)) return;
      if (!response.ok) {
        const { message } = await readError(response);
        throw new Error(message);
      }
      models = (await response.json()).models || [];
    } catch (e) {
      modelSelect.replaceChildren(new Option("No models"));
      setState("error", "");
      showError(`Could not load the list of models: ${e.message}`, "GET /models");
      return;
    }
    modelSelect.replaceChildren(...models.map((m) => new Option(m.name, m.name)));
    modelSelect.disabled = models.length === 0;
    if (models.length === 0) {
      showError("This server has no models.", "");
      return;
    }
    onModelChange();
  }

  // ---- image input ----------------------------------------------------------------------------

  function showPreview(file) {
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    dropHint.hidden = true;
    noPreview.hidden = true;
    dropzone.classList.add("has-file");
    preview.hidden = false;
    preview.alt = `Preview of ${file.name || "the pasted image"}`;
    preview.src = previewUrl;
    const kind = file.type || "unknown type";
    fileInfo.textContent = `${file.name || "pasted image"} · ${formatBytes(file.size)} · ${kind}`;
  }

  preview.addEventListener("load", () => {
    fileInfo.textContent += ` · ${preview.naturalWidth}×${preview.naturalHeight}`;
  });
  preview.addEventListener("error", () => {
    // Not an image, or a format the browser can't draw (TIFF): the server may still read it.
    if (!preview.getAttribute("src")) return;
    preview.hidden = true;
    noPreview.hidden = false;
  });

  function takeFile(file) {
    if (!file) return;
    clearOverlay();
    currentFile = file;
    showPreview(file);
    classify(file);
  }

  function firstFile(list) {
    return list && list.length ? list[0] : null;
  }

  for (const input of [fileInput, cameraInput]) {
    input.addEventListener("change", () => {
      takeFile(firstFile(input.files));
      input.value = ""; // choosing the same file again fires change again
    });
  }
  $("choose").addEventListener("click", () => fileInput.click());
  $("take").addEventListener("click", () => cameraInput.click());

  // Drop anywhere on the page; outside the page's handler the browser would open the file instead.
  let dragDepth = 0;
  document.addEventListener("dragenter", (e) => {
    if (!e.dataTransfer || !Array.from(e.dataTransfer.types).includes("Files")) return;
    e.preventDefault();
    dragDepth += 1;
    dropzone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) dropzone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    if (e.dataTransfer) e.dataTransfer.dropEffect = "copy";
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    dragDepth = 0;
    dropzone.classList.remove("dragging");
    takeFile(firstFile(e.dataTransfer && e.dataTransfer.files));
  });

  document.addEventListener("paste", (e) => {
    const data = e.clipboardData;
    if (!data) return;
    let file = firstFile(data.files);
    if (!file) {
      const item = Array.from(data.items || []).find((i) => i.kind === "file");
      file = item ? item.getAsFile() : null;
    }
    if (!file) return; // a text paste into the results field, say: leave it alone
    e.preventDefault();
    takeFile(file);
  });

  modelSelect.addEventListener("change", onModelChange);
  topkInput.addEventListener("change", () => {
    if (currentFile) classify(currentFile);
  });

  // ---- prediction -----------------------------------------------------------------------------

  function topk() {
    const n = parseInt(topkInput.value, 10);
    const max = parseInt(topkInput.max, 10) || 100;
    if (!Number.isFinite(n) || n < 1) return 1;
    return Math.min(n, max);
  }

  // Time to first byte of the answer, from the browser's Resource Timing: server time plus one trip.
  function serverTime(url) {
    const entries = performance.getEntriesByName(url, "resource");
    const entry = entries[entries.length - 1];
    performance.clearResourceTimings();
    if (!entry || !entry.responseStart || !entry.requestStart) return null;
    return entry.responseStart - entry.requestStart;
  }

  async function classify(file) {
    const m = selectedModel();
    if (!m) return;
    if (inFlight) inFlight.abort();
    const controller = new AbortController();
    inFlight = controller;
    const seq = ++requestSeq;

    clearError();
    setState("loading", `Asking ${m.name}…`);
    results.classList.add("stale");
    latency.hidden = true;

    const form = new FormData();
    form.append("image", file, file.name || "image");
    const query = taskOf(m) === "classify" ? `?topk=${topk()}` : "";
    const url = new URL(`predictions/${encodeURIComponent(m.name)}${query}`, document.baseURI).href;

    const started = performance.now();
    let response;
    let body;
    try {
      response = await api(url, { method: "POST", body: form, signal: controller.signal });
      if (response.ok) body = await response.json();
    } catch (e) {
      if (e.name === "AbortError" || seq !== requestSeq) return;
      results.classList.remove("stale");
      setState("error", "");
      showError(`Could not reach the server: ${e.message}.`, "");
      return;
    }
    const elapsed = performance.now() - started;
    if (seq !== requestSeq) return; // a newer image or setting replaced this one
    inFlight = null;
    results.classList.remove("stale");
    if (askedForKey(response, () => classify(file))) return;

    if (!response.ok) {
      const { message, detail } = await readError(response);
      setState("error", "");
      showError(message, detail);
      revealAnswer();
      return;
    }
    renderResults(body, elapsed, serverTime(url));
    revealAnswer();
  }

  // In one column (phones) the answer is below the image: bring it into view.
  function revealAnswer() {
    const panel = document.querySelector(".output-panel");
    const rect = panel.getBoundingClientRect();
    if (rect.top > window.innerHeight - 80 || rect.bottom < 0) panel.scrollIntoView({ block: "start" });
  }

  function colour(i) {
    return PALETTE[i % PALETTE.length];
  }

  function clearOverlay() {
    overlay.hidden = true;
    summary.hidden = true;
    summary.textContent = "";
  }

  // The overlay canvas has the image's natural size; CSS stretches it over the preview.
  function overlayContext() {
    overlay.width = preview.naturalWidth || 1;
    overlay.height = preview.naturalHeight || 1;
    overlay.hidden = preview.hidden;
    const ctx = overlay.getContext("2d");
    ctx.clearRect(0, 0, overlay.width, overlay.height);
    return ctx;
  }

  function legendItem(text, value, swatchColour, top) {
    const li = document.createElement("li");
    li.className = "prediction" + (top ? " top" : "");
    const row = document.createElement("div");
    row.className = "prediction-row";
    const label = document.createElement("span");
    label.className = "label";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = swatchColour;
    label.append(swatch, document.createTextNode(text));
    const number = document.createElement("span");
    number.className = "probability";
    number.textContent = value;
    row.append(label, number);
    li.append(row);
    return li;
  }

  function renderDetections(body) {
    const detections = body.detections || [];
    const ctx = overlayContext();
    const line = Math.max(2, Math.round(Math.max(overlay.width, overlay.height) / 250));
    ctx.lineWidth = line;
    ctx.font = `${line * 7}px system-ui, sans-serif`;
    ctx.textBaseline = "bottom";
    detections.forEach((d, i) => {
      const [x1, y1, x2, y2] = d.box;
      const c = colour(d.index);
      ctx.strokeStyle = c;
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      (d.keypoints || []).forEach(([x, y]) => {
        ctx.fillStyle = c;
        ctx.beginPath();
        ctx.arc(x, y, line * 1.5, 0, 2 * Math.PI);
        ctx.fill();
      });
      const text = `${d.label} ${percent(d.score)}`;
      const width = ctx.measureText(text).width + line * 2;
      const top = Math.max(y1, line * 8);
      ctx.fillStyle = c;
      ctx.fillRect(x1, top - line * 8, width, line * 8);
      ctx.fillStyle = "#fff";
      ctx.fillText(text, x1 + line, top - line);
    });
    results.replaceChildren(...detections.map((d, i) => legendItem(d.label, percent(d.score), colour(d.index), i === 0)));
    results.hidden = detections.length === 0;
    const best = detections[0];
    return best ? `${detections.length} found; most confident: ${best.label} (${percent(best.score)}).` : "Nothing found above the threshold.";
  }

  function renderMask(body) {
    const classes = body.classes || [];
    const ctx = overlayContext();
    const mask = new Image();
    mask.onload = () => {
      const scratch = document.createElement("canvas");
      scratch.width = mask.width;
      scratch.height = mask.height;
      const sctx = scratch.getContext("2d");
      sctx.drawImage(mask, 0, 0);
      const pixels = sctx.getImageData(0, 0, mask.width, mask.height);
      const rgb = PALETTE.map((hex) => [1, 3, 5].map((k) => parseInt(hex.slice(k, k + 2), 16)));
      const background = new Set(classes.filter((c) => /background/i.test(c.label)).map((c) => c.index));
      for (let p = 0; p < pixels.data.length; p += 4) {
        const index = pixels.data[p];
        const [r, g, b] = rgb[index % rgb.length];
        pixels.data[p] = r;
        pixels.data[p + 1] = g;
        pixels.data[p + 2] = b;
        pixels.data[p + 3] = background.has(index) ? 0 : 115;
      }
      sctx.putImageData(pixels, 0, 0);
      ctx.drawImage(scratch, 0, 0, overlay.width, overlay.height);
      overlay.dataset.drawn = "mask";
    };
    mask.src = `data:image/png;base64,${body.mask.data}`;
    results.replaceChildren(...classes.map((c, i) => legendItem(c.label, percent(c.fraction), colour(c.index), i === 0)));
    results.hidden = classes.length === 0;
    const largest = classes[0];
    return largest ? `${classes.length} classes; largest: ${largest.label} (${percent(largest.fraction)} of the image).` : "";
  }

  function renderEmbedding(body) {
    const values = body.embedding || [];
    const norm = Math.sqrt(values.reduce((sum, v) => sum + v * v, 0));
    results.replaceChildren();
    results.hidden = true;
    summary.textContent = `[${values.slice(0, 6).map((v) => v.toFixed(4)).join(", ")}${values.length > 6 ? ", …" : ""}]`;
    summary.hidden = false;
    return `An embedding of ${body.dim} dimensions, L2 norm ${norm.toFixed(3)}.`;
  }

  function renderResults(body, elapsed, server) {
    clearOverlay();
    let done = null;
    if (body && body.detections) done = renderDetections(body);
    else if (body && body.mask) done = renderMask(body);
    else if (body && body.embedding) done = renderEmbedding(body);
    if (done !== null) {
      showLatency(elapsed, server);
      setState("done", done);
      return;
    }
    renderClasses(body, elapsed, server);
  }

  function showLatency(elapsed, server) {
    let text = `Answered in ${formatMs(elapsed)}`;
    if (server != null) text += ` · server ≈ ${formatMs(server)}`;
    latency.textContent = text;
    latency.title = "Measured in this browser: from sending the image to the parsed answer" +
      (server != null ? "; server: time to the answer's first byte" : "");
    latency.hidden = false;
  }

  function renderClasses(body, elapsed, server) {
    const predictions = (body && body.predictions) || [];
    const top = predictions.length ? predictions[0].probability : 1;
    const items = predictions.map((p, i) => {
      const li = document.createElement("li");
      li.className = "prediction" + (i === 0 ? " top" : "");

      const row = document.createElement("div");
      row.className = "prediction-row";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = p.label != null ? p.label : `class ${p.index}`;
      label.title = `class index ${p.index}`;
      const prob = document.createElement("span");
      prob.className = "probability";
      prob.textContent = percent(p.probability);
      row.append(label, prob);

      const track = document.createElement("div");
      track.className = "bar";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("div");
      fill.className = "bar-fill";
      // Absolute probability: a bar is the share of 100 %, so different answers compare at a glance.
      fill.style.width = Math.max(0.5, p.probability * 100).toFixed(2) + "%";
      track.append(fill);

      li.append(row, track);
      return li;
    });
    results.replaceChildren(...items);
    results.hidden = items.length === 0;
    showLatency(elapsed, server);

    const best = predictions[0];
    setState("done", best ? `Most likely: ${best.label} (${percent(top)}).` : "The model gave no answer.");
  }

  loadModels();
})();
