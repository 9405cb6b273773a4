// Portico dashboard, Studies: a paged, filtered list (GET /studies) and one study's page (GET /studies/{uid},
// its routing from GET /studies/{uid}/routing); retry a failed job and send results again where the role may.
"use strict";

(function () {
  const P = window.Portico;
  const $ = P.$;
  const PAGE = 25;
  const STAGES = ["received", "complete", "routed", "inferred", "reviewed", "sent"];
  const MARK = { done: "✓", waiting: "…", failed: "✗", skipped: "–", pending: "·" };
  let offset = 0;
  let current = null;  // the study shown, if any

  function options(select, values) {
    const chosen = select.value;
    while (select.options.length > 1) {
      select.remove(1);
    }
    for (const value of values) {
      select.add(new Option(value.replace("_", " "), value));
    }
    select.value = values.indexOf(chosen) >= 0 ? chosen : "";
  }

  function day(value, plusOne) {
    // a date field's day, local midnight, as epoch seconds ("up to" includes its day)
    if (!value) {
      return null;
    }
    const [y, m, d] = value.split("-").map(Number);
    return new Date(y, m - 1, d + (plusOne ? 1 : 0)).getTime() / 1000;
  }

  function query() {
    const q = new URLSearchParams({ limit: String(PAGE), offset: String(offset) });
    const since = day($("f-since").value, false);
    const until = day($("f-until").value, true);
    if (since !== null) {
      q.set("since", String(since));
    }
    if (until !== null) {
      q.set("until", String(until));
    }
    for (const [key, id] of [["state", "f-state"], ["calling_ae", "f-ae"], ["model", "f-model"]]) {
      if ($(id).value) {
        q.set(key, $(id).value);
      }
    }
    if ($("f-failed").checked) {
      q.set("failed", "true");
    }
    return q;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined || seconds < 0) {
      return "";
    }
    if (seconds < 90) {
      return seconds.toFixed(seconds < 10 ? 1 : 0) + " s";
    }
    return seconds < 5400 ? Math.round(seconds / 60) + " min" : (seconds / 3600).toFixed(1) + " h";
  }

  function stateCell(row, state) {
    const td = P.cell(row, state.replace("_", " "));
    td.className = "state state-" + state;
    return td;
  }

  // the stages as a compact line (✓ received, ✓ complete +2 s, …), each stage kept on one line
  function stageLine(td, study) {
    let before = null;
    for (const name of STAGES) {
      const stage = study.stages[name];
      const took = stage.at !== null && before !== null ? " +" + duration(stage.at - before) : "";
      const span = document.createElement("span");
      span.className = "stage-" + stage.state;
      span.textContent = MARK[stage.state] + " " + name + took;
      span.title = name + ": " + stage.state + (stage.at !== null ? ", " + P.when(stage.at) : "");
      td.append(span, document.createTextNode(" "));
      if (stage.at !== null) {
        before = stage.at;
      }
    }
  }

  async function loadList() {
    const page = await P.api("/studies?" + query().toString());
    options($("f-state"), page.choices.state);
    options($("f-ae"), page.choices.calling_ae);
    options($("f-model"), page.choices.model);
    const body = $("studies-table").tBodies[0];
    body.textContent = "";
    for (const s of page.studies) {
      const row = body.insertRow();
      const th = P.cell(row, "", true);
      const open = document.createElement("button");
      open.type = "button";
      open.className = "link";
      open.textContent = s.short_uid;
      open.title = "Study Instance UID " + s.study_uid;
      open.setAttribute("aria-label", "Open study " + s.short_uid);
      open.addEventListener("click", () => openStudy(s.study_uid).catch(P.showError));
      th.append(open);
      P.cell(row, s.calling_ae);
      P.cell(row, P.when(s.first_received));
      P.cell(row, s.series_count);
      P.cell(row, s.instance_count);
      P.cell(row, s.models.join(", ") || "–");
      stateCell(row, s.state);
      const stages = P.cell(row, "");
      stages.className = "stage-line";
      stageLine(stages, s);
    }
    if (page.studies.length === 0) {
      P.cell(body.insertRow(), "No study matches.", true).colSpan = 8;
    }
    const last = page.offset + page.studies.length;
    $("studies-range").textContent = page.total ? (page.offset + 1) + "–" + last + " of " + page.total : "none";
    $("studies-caption").textContent = "Studies, most recently received first (" + page.total + ")";
    $("studies-prev").disabled = page.offset === 0;
    $("studies-next").disabled = last >= page.total;
  }

  function fact(list, name, value) {
    const div = document.createElement("div");
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value === null || value === undefined ? "–" : String(value);
    div.append(dt, dd);
    list.append(div);
    return dd;
  }

  function fill(id, rows, width, add) {
    const body = $(id).tBodies[0];
    body.textContent = "";
    for (const r of rows) {
      add(body.insertRow(), r);
    }
    if (rows.length === 0) {
      P.cell(body.insertRow(), "none", true).colSpan = width;
    }
  }

  async function retry(jobId, button) {
    P.clearNotices();
    button.disabled = true;
    try {
      await P.api("/jobs/" + encodeURIComponent(jobId) + "/retry", { method: "POST" });
      P.announce("Job " + jobId + " is back in the queue.");
      await openStudy(current, true);
    } catch (err) {
      button.disabled = false;
      P.showError(err);
    }
  }

  function renderStudy(s) {
    $("study-title").textContent = "Study " + s.short_uid;
    $("study-uid").textContent = s.study_uid;
    const facts = $("study-facts");
    facts.textContent = "";
    fact(facts, "State", s.state.replace("_", " ")).className = "state state-" + s.state;
    fact(facts, "Sender AE", s.calling_ae);
    fact(facts, "First received", P.when(s.first_received));
    fact(facts, "Last received", P.when(s.last_received) + (s.receiving ? " (still receiving)" : ""));
    fact(facts, "Series", s.series_count);
    fact(facts, "Instances", s.instance_count);
    const stages = $("study-stages");
    stages.textContent = "";
    let before = null;
    for (const name of STAGES) {
      const stage = s.stages[name];
      const li = document.createElement("li");
      li.className = "stage-" + stage.state;
      const took = stage.at !== null && before !== null ? " (+" + duration(stage.at - before) + ")" : "";
      li.textContent = MARK[stage.state] + " " + name + ": " + stage.state +
        (stage.at !== null ? ", " + P.when(stage.at) + took : "");
      if (stage.at !== null) {
        before = stage.at;
      }
      stages.append(li);
    }
    fill("study-series", s.series, 5, (row, r) => {
      P.cell(row, P.shortUid(r.series_uid), true).title = "Series Instance UID " + r.series_uid;
      P.cell(row, "…").dataset.series = r.series_uid;
      P.cell(row, r.instances);
      P.cell(row, P.when(r.first_received));
      P.cell(row, P.when(r.last_received));
    });
    const manage = P.may("jobs.manage");
    fill("study-jobs", s.job_list, 8, (row, j) => {
      P.cell(row, j.id, true);
      P.cell(row, j.model + (j.model_version ? "@" + j.model_version : "") + " (rule " + j.rule + ")");
      P.cell(row, P.shortUid(j.series_uid)).title = "Series Instance UID " + j.series_uid;
      const progress = j.progress ? " " + j.progress[0] + "/" + j.progress[1] : "";
      stateCell(row, j.state.toLowerCase()).textContent = j.state + progress;
      P.cell(row, j.attempts);
      P.cell(row, j.error_code ? j.error_code + ": " + j.error_message : j.error_message || "");
      P.cell(row, j.results.map((r) => r.kind).join(", ") || "–");
      const action = row.insertCell();
      if (j.state === "FAILED" && manage) {
        const button = document.createElement("button");
        button.type = "button";
        button.textContent = "Retry";
        button.setAttribute("aria-label", "Retry job " + j.id);
        button.addEventListener("click", () => retry(j.id, button));
        action.append(button);
      }
    });
    fill("study-outbox", s.outbox, 9, (row, o) => {
      P.cell(row, o.id, true);
      P.cell(row, o.job_id);
      P.cell(row, o.destination);
      P.cell(row, P.shortUid(o.sop_instance_uid)).title = "SOP Instance UID " + o.sop_instance_uid;
      stateCell(row, o.state.toLowerCase()).textContent = o.state;
      P.cell(row, o.attempts);
      P.cell(row, o.last_error || "");
      P.cell(row, P.when(o.created));
      P.cell(row, P.when(o.sent_at));
    });
    const destinations = [...new Set(s.outbox.map((o) => o.destination))].sort();
    const select = $("resend-destination");
    select.textContent = "";
    select.add(new Option("every destination", ""));
    for (const d of destinations) {
      select.add(new Option(d, d));
    }
    $("resend-form").hidden = !manage || destinations.length === 0;
    $("study-read-only").hidden = manage;
  }

  async function renderRouting(uid) {
    const body = $("study-routing").tBodies[0];
    body.textContent = "";
    let explanation;
    try {
      explanation = await P.api("/studies/" + encodeURIComponent(uid) + "/routing");
    } catch (err) {
      P.cell(body.insertRow(), "The routing cannot be explained now: " + err.message, true).colSpan = 4;
      return;
    }
    const modality = {};
    for (const s of explanation.series) {
      modality[s.series_uid] = s.modality || "–";
    }
    for (const td of $("study-series").querySelectorAll("td[data-series]")) {
      td.textContent = modality[td.dataset.series] || "–";
    }
    for (const rule of explanation.rules) {
      for (const series of rule.series) {
        const row = body.insertRow();
        P.cell(row, rule.rule, true);
        P.cell(row, rule.model + (rule.model_version ? "@" + rule.model_version : ""));
        P.cell(row, P.shortUid(series.series_uid));
        P.cell(row, series.chosen ? "runs the model" : series.matched ? "matched, another series chosen"
          : "no match: " + series.reasons.join("; "));
      }
      if (!rule.series.length) {
        const row = body.insertRow();
        P.cell(row, rule.rule, true);
        P.cell(row, rule.model);
        P.cell(row, "");
        P.cell(row, "no match: " + rule.study_reasons.join("; "));
      }
    }
    if (!explanation.rules.length) {
      P.cell(body.insertRow(), "No routing rules are configured.", true).colSpan = 4;
    }
  }

  async function openStudy(uid, keepFocus) {
    const study = await P.api("/studies/" + encodeURIComponent(uid));
    current = uid;
    renderStudy(study);
    $("studies-list").hidden = true;
    $("study-detail").hidden = false;
    if (!keepFocus) {
      $("study-title").focus();
    }
    await renderRouting(uid);
  }

  async function backToList() {
    P.clearNotices();
    const was = current;
    current = null;
    $("study-detail").hidden = true;
    $("studies-list").hidden = false;
    await loadList();
    const again = [...$("studies-table").querySelectorAll("button.link")].find((b) => b.title.endsWith(" " + was));
    (again || $("studies-filter").querySelector("input, select")).focus();
  }

  async function load() {
    if (current) {
      await openStudy(current, true);
    } else {
      await loadList();
    }
  }

  function clear() {
    current = null;
    offset = 0;
    for (const id of ["studies-table", "study-series", "study-routing", "study-jobs", "study-outbox"]) {
      $(id).tBodies[0].textContent = "";
    }
    for (const id of ["study-facts", "study-stages", "study-title", "study-uid", "studies-range"]) {
      $(id).textContent = "";
    }
    $("study-detail").hidden = true;
    $("studies-list").hidden = false;
  }

  $("studies-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    P.clearNotices();
    offset = 0;
    loadList().catch(P.showError);
  });
  $("studies-prev").addEventListener("click", () => {
    offset = Math.max(0, offset - PAGE);
    loadList().catch(P.showError);
  });
  $("studies-next").addEventListener("click", () => {
    offset += PAGE;
    loadList().catch(P.showError);
  });
  $("study-back").addEventListener("click", () => backToList().catch(P.showError));
  $("resend-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    P.clearNotices();
    const destination = $("resend-destination").value;
    const button = $("resend-form").querySelector("button");
    button.disabled = true;
    try {
      const out = await P.api("/studies/" + encodeURIComponent(current) + "/resend", {
        method: "POST", body: destination ? { destination: destination } : {},
      });
      P.announce("Queued again: " + Object.entries(out.queued).map(([d, n]) => n + " to " + d).join(", ") + ".");
      await openStudy(current, true);
    } catch (err) {
      P.showError(err);
    } finally {
      button.disabled = false;
    }
  });

  P.registerView("studies", { permission: "status.read", load: load, clear: clear });
})();
