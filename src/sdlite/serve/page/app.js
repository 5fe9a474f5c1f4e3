// sdlite's page: a form over POST /v1/jobs, live progress from the job's server-sent events, the result
// with its parameters and PNG, and a gallery of this browser session's images. Plain JS, no build step.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const GALLERY_KEY = "sdlite.gallery";   // sessionStorage: [{key, url, seed, parameters, thumb}], newest first
  const JOB_KEY = "sdlite.job";           // sessionStorage: the job being followed (resumed after a reload)
  const GALLERY_MAX = 24;
  const BLOBS_MAX = 12;                   // full PNGs kept in memory (the server keeps them a while only)
  const THUMB = 128;
  const MAX_RECONNECTS = 8;
  const blobs = new Map();                // gallery key -> object URL of the PNG (this page load only)
  let config = null;
  let current = null;                     // the job followed: {id, source, step, total, reconnects, resumed}
  let lastSeed = null;

  // --- small helpers ---------------------------------------------------------------------------------

  function say(text, kind) {
    const m = $("message");
    m.textContent = text || "";
    m.className = text ? kind || "error" : "";
  }

  function showStatus(text, fraction) {
    $("progress").hidden = false;
    $("status").textContent = text;
    if (fraction !== undefined) $("bar").value = fraction;
  }

  function seconds(s) {
    if (s < 9.95) return Math.max(0, s).toFixed(1) + " s";
    s = Math.round(s);
    return s < 60 ? s + " s" : Math.floor(s / 60) + " min " + (s % 60) + " s";
  }

  async function readJSON(response) {
    try { return await response.json(); } catch (e) { return null; }
  }

  function storage(key, value) {       // sessionStorage get (value undefined) or set; never throws
    try {
      if (value === undefined) return JSON.parse(sessionStorage.getItem(key) || "null");
      if (value === null) sessionStorage.removeItem(key);
      else sessionStorage.setItem(key, JSON.stringify(value));
      return true;
    } catch (e) {
      return value === undefined ? null : false;
    }
  }

  function errorText(status, body, retryAfter) {
    let detail = "";
    if (body && Array.isArray(body.detail) && body.detail.length) {
      const d = body.detail[0];
      const field = Array.isArray(d.loc) ? d.loc[d.loc.length - 1] : body.field;
      detail = (field ? field + ": " : "") + d.msg;
    } else if (body && typeof body.detail === "string") {
      detail = (body.field ? body.field + ": " : "") + body.detail;
    } else if (body && body.error && typeof body.error.message === "string") {
      detail = body.error.message;
    }
    const later = retryAfter ? " Try again in " + retryAfter + " s." : "";
    if (status === 400 || status === 422) return "Invalid request: " + detail;
    if (status === 429) return "The server is busy: " + (detail || "queue full") + "." + later;
    if (status === 503) return "The server is not taking work now: " + (detail || "unavailable") + "." + later;
    if (status === 401 || status === 403) return "Not allowed: " + (detail || "log in first");
    return "Error " + status + (detail ? ": " + detail : "");
  }

  function numberField(id, label) {
    const text = $(id).value.trim();
    if (text === "") return null;
    const value = Number(text);
    if (!Number.isFinite(value)) throw new Error(label + ": enter a number");
    return value;
  }

  // --- the form ----------------------------------------------------------------------------------------

  function fillSelect(select, values, labels, keep) {
    select.replaceChildren(...values.map((v, i) => new Option(labels[i], v)));
    if (values.includes(keep)) select.value = keep;
  }

  async function loadConfig() {
    const previousSampler = $("sampler").value;
    const previousSize = $("size").value;
    try {
      const r = await fetch("/v1/page/config");
      if (!r.ok) throw new Error(errorText(r.status, await readJSON(r)));
      config = await r.json();
    } catch (e) {
      say("Cannot load the server's settings (" + e.message + "); using defaults.");
      config = config || {model: "", width: 512, height: 512, steps: 20, cfg_scale: 7.5, sampler: "",
                          samplers: [], sizes: ["512x512"], max_width: 1024, max_height: 1024, max_steps: 150};
    }
    $("model-name").textContent = config.model ? "model " + config.model : "";
    const sizes = config.sizes.concat(["custom"]);
    fillSelect($("size"), sizes, config.sizes.map((s) => s.replace("x", " × ")).concat(["Custom…"]),
               previousSize);
    const samplers = config.samplers.length ? config.samplers : [""];
    fillSelect($("sampler"), samplers, config.samplers.length ? samplers : ["Default"],
               previousSampler || config.sampler);
    $("steps").max = config.max_steps;
    if (!$("steps").dataset.set) {
      $("steps").value = config.steps;
      $("cfg").value = config.cfg_scale;
      $("steps").dataset.set = "1";
    }
    for (const [id, value, max] of [["width", config.width, config.max_width],
                                     ["height", config.height, config.max_height]]) {
      $(id).max = max;
      if (!$(id).value) $(id).value = value;
    }
    onSizeChange();
  }

  function onSizeChange() {
    $("custom-size").hidden = $("size").value !== "custom";
  }

  function onSeedModeChange() {
    const mode = $("seed-mode").value;
    const seed = $("seed");
    seed.disabled = mode !== "fixed";
    if (mode === "last") seed.value = lastSeed === null ? "" : lastSeed;
    if (mode === "random") seed.value = "";
    if (mode === "fixed" && seed.value === "" && lastSeed !== null) seed.value = lastSeed;
    seed.placeholder = mode === "random" ? "random" : mode === "last" ? "none yet" : "";
  }

  function requestBody() {
    const body = {
      prompt: $("prompt").value,
      negative_prompt: $("negative").value,
      steps: numberField("steps", "Steps"),
      cfg_scale: numberField("cfg", "CFG scale"),
      sampler_name: $("sampler").value || null,
    };
    if ($("size").value === "custom") {
      body.width = numberField("width", "Width");
      body.height = numberField("height", "Height");
      if (body.width === null || body.height === null) throw new Error("Size: enter a width and a height");
    } else {
      const [w, h] = $("size").value.split("x").map(Number);
      body.width = w;
      body.height = h;
    }
    const mode = $("seed-mode").value;
    body.seed = -1;
    if (mode === "fixed") {
      body.seed = numberField("seed", "Seed");
      if (body.seed === null) throw new Error("Seed: enter a number, or choose Random");
    } else if (mode === "last" && lastSeed !== null) {
      body.seed = lastSeed;
    }
    return body;
  }

  function setRunning(running) {
    $("generate").disabled = running;
    $("cancel").disabled = !running;
    $("model").disabled = running;
  }

  // --- a job -------------------------------------------------------------------------------------------

  async function generate(event) {
    event.preventDefault();
    if (current) return;
    let body;
    try {
      body = requestBody();
    } catch (e) {
      say(e.message);
      return;
    }
    say("");
    setRunning(true);
    showStatus("Submitting…", 0);
    let r;
    try {
      r = await fetch("/v1/jobs", {method: "POST", headers: {"Content-Type": "application/json"},
                                   body: JSON.stringify(body)});
    } catch (e) {
      setRunning(false);
      $("progress").hidden = true;
      say("Cannot reach the server. Is sdlite serve running?");
      return;
    }
    const data = await readJSON(r);
    if (r.status !== 202 || !data || !data.id) {
      setRunning(false);
      $("progress").hidden = true;
      say(errorText(r.status, data, r.headers.get("Retry-After")));
      return;
    }
    follow(data.id, data.events, false);
  }

  function follow(id, url, resumed) {
    const job = {id: id, source: new EventSource(url), step: 0, total: 0, reconnects: 0, resumed: resumed};
    current = job;
    storage(JOB_KEY, {id: id, events: url});
    setRunning(true);
    const on = (name, handle) => job.source.addEventListener(name, (e) => {
      if (current !== job) return;
      job.reconnects = 0;
      handle(JSON.parse(e.data));
    });
    on("queued", (d) => showStatus(d.position ? "Queued: " + d.position + " job(s) ahead" : "Starting…", 0));
    on("progress", (d) => onProgress(job, d));
    on("done", (d) => {
      finish(job);
      showStatus("Done in " + seconds(d.elapsed) + (d.images.length > 1 ? " · " + d.images.length + " images" : ""), 1);
      lastSeed = d.images[0].seed;
      onSeedModeChange();
      const entries = d.images.map((im, k) => ({key: id + "/" + k, url: im.url, seed: im.seed,
                                                parameters: im.parameters, thumb: null}));
      showResult(entries[0]);
      (async () => { for (const entry of entries.slice().reverse()) await keep(entry); })();
    });
    job.source.addEventListener("error", (e) => {
      if (current !== job) return;
      if (e instanceof MessageEvent && e.data) {  // the job's own `error` event
        const d = JSON.parse(e.data);
        finish(job);
        if (d.code === "cancelled") {
          showStatus("Cancelled", job.total ? job.step / job.total : 0);
          say("Cancelled at step " + job.step + " of " + job.total + ".", "info");
        } else {
          say("The generation failed (" + d.status + "): " + d.message);
        }
        return;
      }
      job.reconnects += 1;                       // the connection: EventSource reconnects on its own
      if (job.source.readyState === EventSource.CLOSED || job.reconnects > MAX_RECONNECTS) {
        finish(job);
        $("progress").hidden = true;
        if (!job.resumed) say("Lost contact with the job: the server stopped, restarted or cannot be reached.");
      } else {
        showStatus("Connection lost; reconnecting…");
      }
    });
  }

  function onProgress(job, d) {
    job.step = d.step;
    job.total = d.total;
    let text = "Step " + d.step + " of " + d.total;
    if (d.image_index > 0) text += " (image " + (d.image_index + 1) + ")";
    if (d.eta !== null && d.step > 0) text += " · about " + seconds(d.eta) + " left";
    showStatus(text, d.total ? d.step / d.total : 0);
    if (d.preview) {
      const img = $("image");
      img.onerror = null;
      img.src = d.preview;
      img.className = "preview";
      img.alt = "Preview at step " + d.step;
      $("parameters").textContent = "";
      $("download").hidden = true;
      $("output").hidden = false;
    }
  }

  function finish(job) {
    job.source.close();
    if (current === job) current = null;
    storage(JOB_KEY, null);
    setRunning(false);
  }

  async function cancel() {
    const job = current;
    if (!job) return;
    $("cancel").disabled = true;
    showStatus("Cancelling…");
    try {
      const r = await fetch("/v1/jobs/" + encodeURIComponent(job.id), {method: "DELETE"});
      if (!r.ok) say(errorText(r.status, await readJSON(r)));
    } catch (e) {
      say("Cannot reach the server to cancel.");
      if (current === job) $("cancel").disabled = false;
    }
  }

  // --- the result and the gallery ------------------------------------------------------------------------

  function showResult(entry) {
    const img = $("image");
    img.onerror = () => {                  // gone from the server and not kept here: the thumbnail
      img.onerror = null;
      if (entry.thumb) {
        img.src = entry.thumb;
        say("The full image is no longer on the server; this is its thumbnail.", "info");
      } else {
        say("The image is no longer on the server.");
      }
    };
    img.src = blobs.get(entry.key) || entry.url;
    img.className = "";
    img.alt = "Generated image, seed " + entry.seed;
    $("parameters").textContent = entry.parameters;
    const link = $("download");
    link.href = blobs.get(entry.key) || entry.url;
    link.download = "sdlite-" + entry.seed + ".png";
    link.hidden = false;
    $("output").hidden = false;
  }

  async function thumbnail(blob) {
    const bitmap = await createImageBitmap(blob);
    const scale = THUMB / Math.max(bitmap.width, bitmap.height);
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    return canvas.toDataURL("image/jpeg", 0.8);
  }

  async function keep(entry) {            // into the gallery (the PNG in memory, a thumbnail in sessionStorage)
    try {
      const r = await fetch(entry.url);
      if (r.ok) {
        const blob = await r.blob();
        blobs.set(entry.key, URL.createObjectURL(blob));
        entry.thumb = await thumbnail(blob);
      }
    } catch (e) { /* the gallery shows the server's URL instead */ }
    for (const key of Array.from(blobs.keys()).slice(0, Math.max(0, blobs.size - BLOBS_MAX))) {
      URL.revokeObjectURL(blobs.get(key));
      blobs.delete(key);
    }
    let gallery = [entry].concat((storage(GALLERY_KEY) || []).filter((g) => g.key !== entry.key));
    gallery = gallery.slice(0, GALLERY_MAX);
    while (gallery.length && !storage(GALLERY_KEY, gallery)) gallery.pop();  // storage full: drop the oldest
    renderGallery(gallery);
  }

  function renderGallery(gallery) {
    gallery = gallery || storage(GALLERY_KEY) || [];
    $("gallery-section").hidden = gallery.length === 0;
    $("gallery").replaceChildren(...gallery.map((entry) => {
      const button = document.createElement("button");
      button.type = "button";
      const prompt = entry.parameters.split("\n")[0];
      button.setAttribute("aria-label", "Show image, seed " + entry.seed + ": " + prompt);
      button.title = prompt;
      const img = document.createElement("img");
      img.src = entry.thumb || blobs.get(entry.key) || entry.url;
      img.alt = "";
      img.loading = "lazy";
      button.append(img);
      button.addEventListener("click", () => {
        say("");
        if (!current) $("progress").hidden = true;
        showResult(entry);
      });
      const li = document.createElement("li");
      li.append(button);
      return li;
    }));
  }

  // --- models (GET /v1/models; the selector is hidden when the server has none or one) --------------------

  function modelName(m) {
    return typeof m === "string" ? m : m.title || m.model_name || m.name || m.id || "";
  }

  async function loadModels() {
    const field = $("model-field");
    let body = null;
    try {
      const r = await fetch("/v1/models");
      if (r.ok) body = await readJSON(r);
    } catch (e) { /* no selector */ }
    const list = body && Array.isArray(body.models) ? body.models : Array.isArray(body) ? body : [];
    const names = list.map(modelName).filter(Boolean);
    field.hidden = names.length < 2;
    if (field.hidden) return;
    fillSelect($("model"), names, names, body.current);
  }

  async function switchModel() {
    const want = $("model").value;
    $("generate").disabled = true;
    $("model").disabled = true;
    say("Loading model " + want + "…", "info");
    try {
      const r = await fetch("/v1/models/current", {method: "POST", headers: {"Content-Type": "application/json"},
                                                  body: JSON.stringify({model: want})});
      if (r.ok) {
        say("Model " + want + " loaded.", "info");
        await loadConfig();
      } else {
        say(errorText(r.status, await readJSON(r), r.headers.get("Retry-After")));
      }
    } catch (e) {
      say("Cannot reach the server. Is sdlite serve running?");
    }
    await loadModels();
    setRunning(current !== null);
  }

  // --- start -------------------------------------------------------------------------------------------

  document.addEventListener("DOMContentLoaded", async () => {
    $("form").addEventListener("submit", generate);
    $("cancel").addEventListener("click", cancel);
    $("size").addEventListener("change", onSizeChange);
    $("seed-mode").addEventListener("change", onSeedModeChange);
    $("model").addEventListener("change", switchModel);
    const gallery = storage(GALLERY_KEY) || [];
    if (gallery.length) lastSeed = gallery[0].seed;
    renderGallery(gallery);
    onSeedModeChange();
    await loadConfig();
    await loadModels();
    const resume = storage(JOB_KEY);
    if (resume && resume.id && resume.events) follow(resume.id, resume.events, true);
    document.body.dataset.ready = "1";
  });
})();
