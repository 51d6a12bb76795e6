// mediagen's page: plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const FINISHED = ["succeeded", "failed", "canceled"];
const PAGE = 8;
const $ = (id) => document.getElementById(id);
let models = [];
let following = null; // {close()} of the stream of the job shown
let shown = null; // id of the job shown
let cursor = null;

// --- the API, with the key (if any) from this tab's sessionStorage ---------------------------------
function apiKey() { return sessionStorage.getItem("mediagen.apiKey") || ""; }

async function call(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (apiKey()) headers.Authorization = `Bearer ${apiKey()}`;
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { ...options, headers });
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (response.status === 401) {
    $("key-box").open = true;
    $("form-error").textContent = "This server needs an API key: enter it above.";
  }
  return { status: response.status, body, headers: response.headers };
}

function say(detail) {
  if (!detail) return "";
  return typeof detail === "string" ? detail : detail.message || JSON.stringify(detail);
}

// --- the form, drawn from the model's JSON Schema (GET /models) -------------------------------------
async function loadModels() {
  const { status, body } = await call("/models");
  if (status !== 200) { $("parameters").innerHTML = `<p class="error">Could not load the models (${status}).</p>`; return; }
  models = body.models;
  const select = $("model");
  select.innerHTML = "";
  for (const m of models) {
    const option = new Option(m.model, m.model, m.default, m.default);
    select.add(option);
  }
  drawParameters();
}

function currentModel() { return models.find((m) => m.model === $("model").value); }

function fieldId(name) { return `param-${name}`; }

function drawParameters() {
  const model = currentModel();
  const box = $("parameters");
  box.innerHTML = "<legend>Parameters</legend>";
  if (!model) return;
  const price = model.price ? ` · $${model.price.usd} per ${model.price.per}` : "";
  $("model-info").textContent = `Makes ${model.output.kind}s${price}`;
  const grid = document.createElement("div");
  grid.className = "params";
  const props = model.input_schema.properties || {};
  const names = Object.keys(props).filter((n) => n !== "prompt")
    .sort((a, b) => (props[a]["x-order"] ?? 99) - (props[b]["x-order"] ?? 99));
  for (const name of names) grid.appendChild(parameterField(name, props[name], model));
  box.appendChild(grid);
}

function parameterField(name, schema, model) {
  const wrap = document.createElement("div");
  wrap.className = "field";
  wrap.dataset.field = `parameters.${name}`;
  const id = fieldId(name);
  const label = document.createElement("label");
  label.htmlFor = id;
  label.textContent = schema.title || name;
  const fallback = model.service_defaults[name] ?? schema.default;
  let input;
  if (Array.isArray(schema.enum)) {
    input = document.createElement("select");
    for (const value of schema.enum) input.add(new Option(String(value), String(value), value === fallback, value === fallback));
  } else if (schema.type === "boolean") {
    input = document.createElement("input");
    input.type = "checkbox";
    input.checked = Boolean(fallback);
    wrap.classList.add("check");
  } else if (schema.type === "integer" || schema.type === "number") {
    input = document.createElement("input");
    input.type = "number";
    input.step = schema.type === "integer" ? "1" : "any";
    if (schema.minimum !== undefined) input.min = schema.minimum;
    if (schema.maximum !== undefined) input.max = schema.maximum;
    if (fallback !== undefined) input.value = fallback;
  } else {
    input = document.createElement("input");
    input.type = "text";
    if (fallback !== undefined) input.value = fallback;
  }
  input.id = id;
  input.name = name;
  input.dataset.kind = schema.type || "string";
  input.dataset.initial = input.type === "checkbox" ? String(input.checked) : input.value;
  const error = document.createElement("p");
  error.className = "error";
  error.id = `parameters.${name}-error`;
  error.setAttribute("role", "alert");
  const describedBy = [error.id];
  const parts = input.type === "checkbox" ? [input, label] : [label, input];
  if (schema.description) {
    const hint = document.createElement("p");
    hint.className = "hint";
    hint.id = `${id}-hint`;
    hint.textContent = schema.description;
    describedBy.unshift(hint.id);
    parts.push(hint);
  }
  wrap.append(...parts, error);
  input.setAttribute("aria-describedby", describedBy.join(" "));
  return wrap;
}

function parametersFromForm() {
  const parameters = { model: $("model").value };
  for (const input of $("parameters").querySelectorAll("input, select")) {
    const value = input.type === "checkbox" ? String(input.checked) : input.value;
    if (value === input.dataset.initial || value === "") continue; // the model's default: leave it out
    if (input.type === "checkbox") parameters[input.name] = input.checked;
    else if (input.dataset.kind === "integer" || input.dataset.kind === "number") parameters[input.name] = Number(value);
    else parameters[input.name] = value;
  }
  // The form draws the model's Replicate schema: a field of Replicate's own (not one of the portable
  // ones) pins the job there, or a job that may fail over to another provider would be refused (422).
  const portable = ["model", "width", "height", "num_outputs", "seed", "output_format"];
  const own = Object.keys(parameters).some((name) => !portable.includes(name));
  const routes = (currentModel() || {}).routes || [];
  if (own && routes.length > 1 && routes.some((r) => r.provider === "replicate")) parameters.provider = "replicate";
  return parameters;
}

function clearErrors() {
  for (const el of document.querySelectorAll("#generate .error")) el.textContent = "";
  for (const el of document.querySelectorAll("#generate [aria-invalid]")) el.removeAttribute("aria-invalid");
}

function showErrors(detail) {
  const fields = (detail && detail.fields) || [];
  let placed = 0;
  let first = null;
  for (const problem of fields) {
    const wrap = document.querySelector(`#generate [data-field="${CSS.escape(problem.field)}"]`);
    if (!wrap) continue;
    wrap.querySelector(".error").textContent = problem.message;
    const input = wrap.querySelector("input, select, textarea");
    input.setAttribute("aria-invalid", "true");
    first = first || input;
    placed += 1;
  }
  if (placed < fields.length || !fields.length) $("form-error").textContent = say(detail);
  if (first) first.focus();
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const button = $("submit");
  button.disabled = true;
  try {
    const body = { prompt: $("prompt").value, parameters: parametersFromForm() };
    const { status, body: answer } = await call("/generate", { method: "POST", body: JSON.stringify(body) });
    if (status === 202 || status === 200) {
      show(answer.job_id, body.prompt);
      refreshGallery();
    } else if (status === 422) {
      showErrors(answer.detail);
    } else if (status !== 401) {
      $("form-error").textContent = `${status}: ${say(answer && answer.detail)}`;
    }
  } finally {
    button.disabled = false;
  }
}

// --- one job: live over server-sent events ----------------------------------------------------------
function show(jobId, prompt) {
  if (following) following.close();
  shown = jobId;
  $("job").hidden = false;
  $("job-id").textContent = jobId.slice(0, 8);
  $("job-prompt").textContent = prompt || "";
  $("job-status").textContent = "…";
  $("job-error").textContent = "";
  $("results").innerHTML = "";
  $("job-progress").removeAttribute("value");
  $("timeline").innerHTML = "";
  following = follow(jobId, (data) => { if (shown === jobId) render(data); });
}

function follow(jobId, onData) {
  const url = `/jobs/${jobId}/events`;
  if (!apiKey() && window.EventSource) {
    const source = new EventSource(url);
    const handle = (event) => {
      const data = JSON.parse(event.data);
      onData(data);
      if (FINISHED.includes(data.status)) source.close(); // else it would reconnect for ever
    };
    source.addEventListener("status", handle);
    source.addEventListener("progress", handle);
    return source;
  }
  // EventSource cannot send an Authorization header: read the same stream with fetch.
  const controller = new AbortController();
  (async () => {
    let lastId = "";
    while (!controller.signal.aborted) {
      try {
        const headers = { Authorization: `Bearer ${apiKey()}` };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const response = await fetch(url, { headers, signal: controller.signal });
        if (!response.ok) return;
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        let finished = false;
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer = (buffer + value).replace(/\r\n/g, "\n"); // sse-starlette ends lines with CRLF
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
            const id = block.split("\n").find((l) => l.startsWith("id:"));
            if (id) lastId = id.slice(3).trim();
            if (data) {
              const parsed = JSON.parse(data);
              onData(parsed);
              finished = FINISHED.includes(parsed.status);
            }
          }
        }
        if (finished) return;
      } catch (error) {
        if (controller.signal.aborted) return;
      }
      await new Promise((resolve) => setTimeout(resolve, 2000)); // a lost connection: resume
    }
  })();
  return { close: () => controller.abort() };
}

function render(data) {
  $("job-status").textContent = data.status;
  $("job-status").className = `status-${data.status}`;
  const bar = $("job-progress");
  if (data.progress === null || data.progress === undefined) bar.removeAttribute("value");
  else bar.value = data.progress;
  bar.setAttribute("aria-valuetext", data.progress == null ? "unknown" : `${Math.round(data.progress * 100)}%`);
  $("job-error").textContent = data.error || "";
  $("cancel").hidden = FINISHED.includes(data.status);
  const results = $("results");
  if (data.status === "succeeded" && !results.childElementCount) {
    data.result_urls.forEach((url, n) => results.appendChild(media(url, `Result ${n + 1} of the job`)));
    refreshGallery();
  }
  if (FINISHED.includes(data.status)) refreshGallery();
  loadTimeline(data.job_id);
}

function media(url, alt) {
  const video = /\.(mp4|webm)$/i.test(url);
  const el = document.createElement(video ? "video" : "img");
  if (video) { el.controls = true; el.setAttribute("aria-label", alt); } else { el.alt = alt; }
  setSource(el, url);
  return el;
}

// With API keys, media need the Authorization header too, which <img src> cannot send: fetch them.
async function setSource(el, url) {
  if (!apiKey()) { el.src = url; return; }
  const response = await fetch(url, { headers: { Authorization: `Bearer ${apiKey()}` } });
  if (response.ok) el.src = URL.createObjectURL(await response.blob());
}

async function loadTimeline(jobId) {
  const { status, body } = await call(`/jobs/${jobId}`);
  if (status !== 200 || shown !== jobId) return;
  const items = [`Submitted ${time(body.created_at)} (model ${body.model})`];
  for (const a of body.attempt_history) {
    if (a.failover_from) items.push(`Failed over from ${a.failover_from} to ${a.provider}`);
    let line = `Attempt ${a.number} ${time(a.started_at)} at ${a.provider || "replicate"}: ${a.outcome || "running"}`;
    if (a.resumed) line += " (resumed its prediction)";
    if (a.error_class) line += ` — ${a.error_class}: ${a.error_message}${a.http_status ? ` (HTTP ${a.http_status})` : ""}`;
    items.push(line);
    if (a.retry_delay_seconds != null) items.push(`Waited ${a.retry_delay_seconds.toFixed(2)} s before the next attempt`);
  }
  for (const d of body.webhook_deliveries || []) {
    const tries = d.history.map((t) => (t.status_code ? `HTTP ${t.status_code}` : t.error || "no answer")).join(", ");
    items.push(`Webhook ${d.event}: ${d.state} after ${d.tries} ${d.tries === 1 ? "try" : "tries"}${tries ? ` (${tries})` : ""}`);
  }
  if (body.finished_at) items.push(`Finished ${time(body.finished_at)}: ${body.status}`);
  const list = $("timeline");
  list.innerHTML = "";
  for (const text of items) {
    const li = document.createElement("li");
    li.textContent = text;
    list.appendChild(li);
  }
}

function time(iso) { return iso ? new Date(iso).toLocaleTimeString() : "–"; }

async function cancel() {
  if (!shown) return;
  const { status, body } = await call(`/jobs/${shown}/cancel`, { method: "POST" });
  if (status === 409 || status >= 500) $("job-error").textContent = say(body && body.detail);
}

// --- recent jobs, a page at a time (cursor paging) --------------------------------------------------
async function loadPage(reset) {
  const query = new URLSearchParams({ limit: String(PAGE) });
  if (!reset && cursor) query.set("cursor", cursor);
  const { status, body } = await call(`/jobs?${query}`);
  if (status !== 200) return;
  const list = $("gallery");
  if (reset) list.innerHTML = "";
  for (const job of body.items) list.appendChild(tile(job));
  cursor = body.next_cursor;
  $("more").hidden = !cursor;
}

function tile(job) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.dataset.job = job.job_id;
  const url = (job.result_urls || [])[0];
  if (url && !/\.(mp4|webm)$/i.test(url)) {
    const img = document.createElement("img");
    img.alt = "";
    img.loading = "lazy";
    setSource(img, url);
    button.appendChild(img);
  } else {
    const placeholder = document.createElement("span");
    placeholder.className = "noimg";
    placeholder.textContent = url ? "video" : job.status;
    button.appendChild(placeholder);
  }
  const caption = document.createElement("span");
  caption.className = "caption";
  caption.innerHTML = `<span class="status-${job.status}"></span> `;
  caption.firstChild.textContent = job.status;
  caption.append(document.createTextNode(job.prompt));
  button.appendChild(caption);
  button.setAttribute("aria-label", `${job.status}: ${job.prompt}`);
  button.addEventListener("click", () => show(job.job_id, job.prompt));
  li.appendChild(button);
  return li;
}

let galleryTimer = null;
function refreshGallery() {
  clearTimeout(galleryTimer);
  galleryTimer = setTimeout(() => loadPage(true), 300);
}

// --- start ------------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  const key = $("api-key");
  key.value = apiKey();
  key.addEventListener("change", () => {
    sessionStorage.setItem("mediagen.apiKey", key.value.trim());
    $("form-error").textContent = "";
    loadModels();
    loadPage(true);
  });
  $("key-form").addEventListener("submit", (event) => { event.preventDefault(); key.dispatchEvent(new Event("change")); });
  $("model").addEventListener("change", drawParameters);
  $("generate").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("more").addEventListener("click", () => loadPage(false));
  loadModels();
  loadPage(true);
});
