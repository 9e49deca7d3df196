// The console's own script (no framework, no build step): the control room's live alert queue (Server-Sent
// Events), its visible and audible cue, and a retrospective job's progress bar. Every page works without it.
"use strict";
(function () {
  var audio = null;

  function text(tag, value) { var el = document.createElement(tag); el.textContent = value; return el; }
  function clock(ms) { return new Date(ms).toISOString().slice(11, 19); }

  function beep() {
    if (!audio) { return; }
    var osc = audio.createOscillator(), gain = audio.createGain();
    osc.frequency.value = 880; gain.gain.value = 0.2;
    osc.connect(gain); gain.connect(audio.destination);
    osc.start(); osc.stop(audio.currentTime + 0.25);
  }

  function cue(message) {
    var el = document.getElementById("cue");
    if (!el) { return; }
    el.textContent = message; el.hidden = false;
    document.title = "(!) " + document.title.replace(/^\(!\) /, "");
    beep();
  }

  function alertRow(a) {
    var row = document.createElement("tr");
    row.id = "alert-" + a.alert_id;
    row.dataset.alert = a.alert_id;
    row.appendChild(text("td", clock(a.raised_ms)));
    row.appendChild(text("td", a.subject_ref));
    row.appendChild(text("td", a.score.toFixed(3) + " / " + a.threshold.toFixed(3)));
    row.appendChild(text("td", a.camera));
    var state = text("td", "awaiting decision"); state.className = "state"; row.appendChild(state);
    var cell = document.createElement("td"), link = text("a", "Review alert " + a.subject_ref);
    link.href = a.url; cell.appendChild(link); row.appendChild(cell);
    return row;
  }

  function onAlert(a) {
    var body = document.getElementById("queue-body"), row = document.getElementById("alert-" + a.alert_id);
    var fresh = !row;
    if (fresh) {
      row = alertRow(a);
      body.insertBefore(row, body.firstChild);
      var empty = document.getElementById("empty-queue");
      if (empty) { empty.hidden = true; }
    } else {
      row.children[2].textContent = a.score.toFixed(3) + " / " + a.threshold.toFixed(3);
    }
    row.dataset.captureMs = a.capture_ms;
    row.dataset.revision = a.revision;
    if (!row.dataset.shownMs) {  // when it became visible, and its frame's capture (bench, tests)
      row.dataset.shownMs = Date.now();
      row.dataset.firstCaptureMs = a.capture_ms;
      row.dataset.raisedMs = a.raised_ms;
    }
    if (fresh) {
      row.classList.add("new");
      cue("New alert: " + a.subject_ref + " on " + a.camera + " (score " + a.score.toFixed(3) + ")");
    }
  }

  function onStats(s) {
    ["faces_seen", "alerts", "pending", "disposed", "dropped", "disposal_p50", "disposal_max"].forEach(function (k) {
      var el = document.getElementById("stat-" + k);
      if (el) { el.textContent = s[k]; }
    });
    var overdue = {};
    (s.overdue || []).forEach(function (id) { overdue[id] = true; });
    Array.prototype.forEach.call(document.querySelectorAll("#queue-body tr[data-alert]"), function (row) {
      var id = row.dataset.alert, state = row.querySelector("td.state"), decided = s.adjudicated && s.adjudicated[id];
      row.classList.toggle("overdue", !!overdue[id] && !decided);
      if (decided) { state.textContent = decided; row.classList.remove("new"); }
      else if (overdue[id]) { state.textContent = "OVERDUE"; }
    });
    Object.keys(s.sources || {}).forEach(function (id) {
      var row = document.querySelector('#sources tr[data-source="' + id + '"]');
      if (row) {
        row.querySelector(".src-state").textContent = s.sources[id].state;
        row.querySelector(".src-frames").textContent = s.sources[id].frames;
      }
    });
  }

  function controlRoom() {
    var queue = document.getElementById("queue");
    if (!queue || !window.EventSource) { return; }
    var source = new EventSource(queue.dataset.stream);
    source.addEventListener("alert", function (e) { onAlert(JSON.parse(e.data)); });
    source.addEventListener("stats", function (e) { onStats(JSON.parse(e.data)); });
    source.addEventListener("problem", function (e) { cue(JSON.parse(e.data).message); });
    source.addEventListener("open", function () { queue.dataset.live = "1"; });
    var sound = document.getElementById("sound");
    if (sound) {
      sound.addEventListener("click", function () {
        var Ctx = window.AudioContext || window.webkitAudioContext;
        if (!audio && Ctx) { audio = new Ctx(); }
        var on = sound.getAttribute("aria-pressed") !== "true";
        if (!on) { audio = null; }
        sound.setAttribute("aria-pressed", on ? "true" : "false");
        sound.textContent = on ? "Turn off the sound cue" : "Turn on the sound cue";
        if (on) { beep(); }
      });
    }
  }

  function jobProgress() {
    var bar = document.getElementById("job-progress");
    if (!bar || !bar.dataset.poll) { return; }
    var timer = setInterval(function () {
      fetch(bar.dataset.poll, { credentials: "same-origin" }).then(function (r) { return r.json(); }).then(function (p) {
        bar.max = Math.max(p.frames_total, 1); bar.value = p.frames_done;
        document.getElementById("job-progress-text").textContent = p.frames_done + " of " + p.frames_total +
          " frames, " + p.items_done + " of " + p.items_total + " items, " + p.results + " results";
        document.getElementById("job-state").textContent = p.state;
        if (["queued", "running"].indexOf(p.state) < 0) { clearInterval(timer); window.location.reload(); }
      }).catch(function () { clearInterval(timer); });
    }, 1000);
  }

  document.addEventListener("DOMContentLoaded", function () { controlRoom(); jobProgress(); });
}());
