// The qasr page: a file through /v1/audio/transcriptions (stream=true), the microphone through
// /v1/realtime. Plain browser APIs only: no framework, no build step, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { key: sessionStorage.getItem("qasr-key") || "", info: null, file: null, busy: false, mic: null };

function headers() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

function showError(message) {
  $("status").textContent = message || "";
}

// -- the server panel and the key ------------------------------------------------------------

async function loadInfo() {
  if (!state.key && !state.info) {  // ask for a key before a request could be refused for want of one
    const health = await (await fetch("/health")).json();
    if (health.key_required) {
      $("key-form").hidden = false;
      return;
    }
  }
  const response = await fetch("/info", { headers: headers() });
  if (response.status === 401) {
    $("key-form").hidden = false;
    $("key-error").textContent = state.key ? "that key was refused" : "";
    return;
  }
  $("key-form").hidden = true;
  const info = await response.json();
  state.info = info;
  $("info-model").textContent = info.model;
  $("info-backend").textContent = info.backend || info.state;
  $("info-device").textContent = info.device || "…";
  $("info-threads").textContent = info.threads;
  $("info-memory").textContent = info.memory_mb == null ? "unknown" : `${info.memory_mb} MB`;
  $("info-aligner").textContent = info.aligner ? "loaded (word times, srt, vtt)" : "none";
  $("info-languages").textContent = info.languages.length ? info.languages.join(", ") : "…";
  const select = $("language");
  if (select.options.length === 1) {
    for (const name of info.languages) select.add(new Option(name, name));
  }
  if (info.state !== "ready") setTimeout(loadInfo, 1000);
  updateButtons();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("key").value.trim();
  sessionStorage.setItem("qasr-key", state.key);
  loadInfo();
});

function updateButtons() {
  const ready = state.info && state.info.state === "ready";
  $("transcribe").disabled = !ready || !state.file || state.busy;
  $("record").disabled = !ready || (state.busy && !state.mic);
}

// -- choosing a file: player, duration, waveform -----------------------------------------------

$("file").addEventListener("change", () => chooseFile($("file").files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  if (event.dataTransfer.files.length) chooseFile(event.dataTransfer.files[0]);
});

async function chooseFile(file) {
  if (!file) return;
  state.file = file;
  showError("");
  $("preview").hidden = false;
  $("player").src = URL.createObjectURL(file);
  $("file-facts").textContent = `${file.name} · ${(file.size / 1024).toFixed(0)} KiB`;
  updateButtons();
  try {
    const context = new AudioContext();
    const audio = await context.decodeAudioData(await file.arrayBuffer());
    context.close();
    drawWaveform(audio);
    $("file-facts").textContent = `${file.name} · ${audio.duration.toFixed(2)} s · ` +
      `${audio.numberOfChannels} channel${audio.numberOfChannels > 1 ? "s" : ""} · ${(file.size / 1024).toFixed(0)} KiB`;
  } catch (error) {
    // The browser cannot decode every format the server can (libsndfile); the server decides.
    $("file-facts").textContent += " · no preview of this format in the browser";
  }
}

function drawWaveform(audio) {
  const canvas = $("waveform");
  const g = canvas.getContext("2d");
  const samples = audio.getChannelData(0);
  const step = Math.max(1, Math.floor(samples.length / canvas.width));
  g.clearRect(0, 0, canvas.width, canvas.height);
  g.fillStyle = "#2f6fde";
  const middle = canvas.height / 2;
  for (let x = 0; x < canvas.width; x++) {
    let low = 0, high = 0;
    for (let i = x * step; i < Math.min(samples.length, (x + 1) * step); i++) {
      low = Math.min(low, samples[i]);
      high = Math.max(high, samples[i]);
    }
    g.fillRect(x, middle - high * middle, 1, Math.max(1, (high - low) * middle));
  }
}

// -- transcribing a file: server-sent events -------------------------------------------------

$("transcribe").addEventListener("click", transcribeFile);

async function transcribeFile() {
  state.busy = true;
  updateButtons();
  showError("");
  $("transcript").value = "";
  $("downloads").textContent = "";
  $("facts").textContent = "";
  const form = new FormData();
  form.append("file", state.file);
  form.append("model", state.info.model);
  form.append("stream", "true");
  if ($("language").value) form.append("language", $("language").value);
  if ($("context").value) form.append("prompt", $("context").value);
  if (state.info.aligner) form.append("timestamp_granularities[]", "word");
  const started = performance.now();
  const duration = $("player").duration;
  const tick = setInterval(() => {
    const elapsed = (performance.now() - started) / 1000;
    $("progress").textContent = `working: ${elapsed.toFixed(1)} s` +
      (isFinite(duration) ? ` for ${duration.toFixed(1)} s of audio` : "");
  }, 200);
  try {
    const response = await fetch("/v1/audio/transcriptions", { method: "POST", headers: headers(), body: form });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `HTTP ${response.status}`);
    }
    await readEvents(response, (event) => {
      if (event.type === "transcript.text.delta") $("transcript").value += event.delta;
      else if (event.type === "transcript.text.done") showResult(event, duration);
      else if (event.type === "error") throw new Error(event.error.message);
    });
  } catch (error) {
    showError(error.message);
    $("progress").textContent = "";
  } finally {
    clearInterval(tick);
    state.busy = false;
    updateButtons();
    loadInfo();
  }
}

async function readEvents(response, handle) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data && data !== "[DONE]") handle(JSON.parse(data));
    }
  }
}

function showResult(event, duration) {
  const q = event.qasr;
  $("transcript").value = event.text;
  const t = q.timings;
  $("progress").textContent = `done: ${q.duration.toFixed(1)} s of ${q.duration.toFixed(1)} s`;
  const stages = ["audio", "encoder", "prefill", "decode", "align"].filter((s) => s in t)
    .map((s) => `${s} ${t[s].toFixed(2)} s`).join(", ");
  $("facts").textContent = `${q.duration.toFixed(2)} s · ${q.audio.sample_rate} Hz · ${q.audio.channels} ` +
    `channel${q.audio.channels > 1 ? "s" : ""} · ${q.audio.format} · language ${q.language || "none"} · ` +
    `RTF ${t.rtf.toFixed(3)} (${t.total.toFixed(2)} s: ${stages})` + (q.truncated ? " · text cut by the token budget" : "");
  const links = $("downloads");
  links.textContent = "Download: ";
  const stem = (state.file.name.replace(/\.[^.]*$/, "") || "audio");
  for (const [name, text] of Object.entries(q.files)) {
    const a = document.createElement("a");
    a.textContent = name;
    a.download = `${stem}.${name}`;
    a.href = "#";
    a.addEventListener("click", () => {
      const body = name === "txt" ? $("transcript").value + "\n" : text;  // txt follows your edits
      a.href = URL.createObjectURL(new Blob([body], { type: "text/plain;charset=utf-8" }));
    });
    links.append(a);
  }
}

$("copy").addEventListener("click", () => {
  const text = $("transcript");
  text.select();
  (navigator.clipboard ? navigator.clipboard.writeText(text.value) : Promise.resolve()).catch(() => {});
});

// -- the microphone: an AudioWorklet, pcm16 over the realtime WebSocket ------------------------

$("record").addEventListener("click", () => (state.mic ? stopRecording() : startRecording()));

async function startRecording() {
  showError("");
  const mic = { done: "", live: "" };
  state.mic = mic;
  state.busy = true;
  $("record").classList.add("on");
  $("record").textContent = "Stop";
  $("transcript").value = "";
  updateButtons();
  try {
    // The raw microphone, as an uploaded file reaches the model: the browser's call processing
    // (echo cancellation, noise suppression, automatic gain) is on by default and reshapes the
    // waveform: in tests/server/test_page.py its gain lifted speech 1.6x, clipped it and cut the received
    // PCM's match to the file from 0.98 to 0.71, and the demo model misheard the altered words.
    mic.stream = await navigator.mediaDevices.getUserMedia({ audio: {
      channelCount: 1, echoCancellation: false, noiseSuppression: false, autoGainControl: false } });
    mic.context = new AudioContext({ sampleRate: 16000 });
    await mic.context.audioWorklet.addModule("/static/worklet.js");
    mic.ws = await openRealtime(mic);
    const source = mic.context.createMediaStreamSource(mic.stream);
    mic.node = new AudioWorkletNode(mic.context, "pcm16-capture");
    mic.node.port.onmessage = (event) => sendAudio(mic, event.data);
    source.connect(mic.node);
    mic.started = performance.now();
    mic.tick = setInterval(() => {
      $("progress").textContent = `recording: ${((performance.now() - mic.started) / 1000).toFixed(1)} s`;
    }, 200);
  } catch (error) {
    showError(`microphone: ${error.message || error}`);
    cleanUpMic(mic);
  }
}

function openRealtime(mic) {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const protocols = ["realtime"].concat(state.key ? [`openai-insecure-api-key.${state.key}`] : []);
  const ws = new WebSocket(`${scheme}://${location.host}/v1/realtime?model=${encodeURIComponent(state.info.model)}`,
                           protocols);
  return new Promise((resolve, reject) => {
    ws.onerror = () => reject(new Error("the realtime connection failed"));
    ws.onclose = (event) => { if (state.mic === mic) { showError(event.reason || ""); cleanUpMic(mic); } };
    ws.onmessage = (message) => {
      const event = JSON.parse(message.data);
      if (event.type === "session.created") {
        ws.send(JSON.stringify({ type: "session.update", session: {
          type: "transcription",
          audio: { input: {
            format: { type: "audio/pcm", rate: 16000 },
            transcription: { model: state.info.model, language: languageCode(), prompt: $("context").value },
            turn_detection: null } } } }));
      } else if (event.type === "session.updated") {
        resolve(ws);
      } else if (event.type === "conversation.item.input_audio_transcription.delta") {
        mic.live += event.delta;
        showMicText(mic);
      } else if (event.type === "conversation.item.input_audio_transcription.completed") {
        mic.done += (mic.done ? " " : "") + event.transcript;
        mic.live = "";
        showMicText(mic);
        if (mic.stopping) { ws.close(); cleanUpMic(mic); }
      } else if (event.type === "error") {
        showError(event.error.message);
        reject(new Error(event.error.message));
      }
    };
  });
}

function languageCode() {
  return $("language").value || undefined;
}

function showMicText(mic) {
  $("transcript").value = mic.done + (mic.done && mic.live ? " " : "") + mic.live;
}

function sendAudio(mic, samples) {
  if (!mic.ws || mic.ws.readyState !== WebSocket.OPEN || mic.stopping) return;
  const bytes = new Uint8Array(samples.buffer);
  let binary = "";
  for (let i = 0; i < bytes.length; i += 0x8000) binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  mic.ws.send(JSON.stringify({ type: "input_audio_buffer.append", audio: btoa(binary) }));
}

function stopRecording() {
  const mic = state.mic;
  if (!mic.ws || mic.ws.readyState !== WebSocket.OPEN) { cleanUpMic(mic); return; }
  mic.stopping = true;
  stopCapture(mic);
  mic.ws.send(JSON.stringify({ type: "input_audio_buffer.commit" }));
  $("record").disabled = true;
  $("progress").textContent = "finishing…";
}

function stopCapture(mic) {
  clearInterval(mic.tick);
  if (mic.stream) mic.stream.getTracks().forEach((track) => track.stop());
  if (mic.context && mic.context.state !== "closed") mic.context.close();
}

function cleanUpMic(mic) {
  stopCapture(mic);
  if (state.mic !== mic) return;
  state.mic = null;
  state.busy = false;
  $("record").classList.remove("on");
  $("record").textContent = "Record";
  $("progress").textContent = "";
  updateButtons();
  loadInfo();
}

loadInfo();
setInterval(() => { if (!state.busy && state.info) loadInfo(); }, 5000);
