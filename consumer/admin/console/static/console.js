// Herald console: progressive enhancement only. Every page reads without it.
"use strict";
(function () {
  // "Select every row on this page".
  document.querySelectorAll("input.select-all").forEach(function (all) {
    all.addEventListener("change", function () {
      var table = all.closest("table");
      table.querySelectorAll("tbody input[type=checkbox][name=id]").forEach(function (box) {
        box.checked = all.checked;
      });
    });
  });

  // Ask before destructive buttons that say so.
  document.querySelectorAll("button[data-confirm]").forEach(function (button) {
    button.addEventListener("click", function (event) {
      if (!window.confirm(button.getAttribute("data-confirm"))) { event.preventDefault(); }
    });
  });

  // A job's live progress: poll its JSON until it ends, then reload once for the final page.
  var job = document.getElementById("job");
  if (!job || job.getAttribute("data-active") !== "1") { return; }
  var url = job.getAttribute("data-job-url");
  var bar = document.getElementById("job-progress");
  function set(id, text) {
    var el = document.getElementById(id);
    if (el) { el.textContent = text; }
  }
  function poll() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (state) {
        var total = state.total || 0;
        if (total) { bar.max = total; }
        bar.value = state.state === "done" ? (total || 1) : state.done;
        set("job-done", state.done.toLocaleString());
        set("job-total", state.total === null ? "…" : total.toLocaleString());
        set("job-percent", state.percent === null ? "0" : String(state.percent));
        var report = state.report || {};
        if (report.replayed !== undefined) { set("job-replayed", report.replayed.toLocaleString()); }
        if (report.already_delivered !== undefined) { set("job-delivered", report.already_delivered.toLocaleString()); }
        var badge = document.querySelector("#job-state .badge");
        if (badge) { badge.textContent = state.state; badge.className = "badge state-" + state.state; }
        if (state.state === "queued" || state.state === "running") {
          window.setTimeout(poll, 700);
        } else {
          window.location.reload();
        }
      })
      .catch(function () { window.setTimeout(poll, 3000); });
  }
  window.setTimeout(poll, 300);
})();
