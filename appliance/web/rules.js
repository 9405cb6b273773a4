// Portico dashboard, Rules (GET /rules): the active rules file with line numbers, validated, its warnings;
// and a tester: pick a stored study (GET /studies) and see which rules would fire (GET /studies/{uid}/routing,
// a dry run that makes no job).
"use strict";

(function () {
  const P = window.Portico;
  const $ = P.$;

  function listItems(list, items) {
    list.textContent = "";
    for (const text of items) {
      const li = document.createElement("li");
      li.textContent = text;
      list.append(li);
    }
    list.hidden = items.length === 0;
  }

  function renderFile(file) {
    $("rules-path").textContent = file.path;
    const verdict = $("rules-verdict");
    verdict.className = "notice " + (file.valid ? "ok" : "error");
    verdict.textContent = file.valid
      ? "Valid: " + file.rules.length + " rule(s)" + (file.warnings.length ? ", " + file.warnings.length +
        " warning(s)." : ", no warnings.")
      : file.exists ? "Invalid: " + file.problems.length + " problem(s). The appliance routes nothing new until " +
        "the file is fixed." : "The rules file cannot be read.";
    listItems($("rules-problems"), file.problems.map((p) => (p.line ? "Line " + p.line + ": " : "") + p.message));
    listItems($("rules-warnings"), file.warnings.map((w) => "Warning: " + w));
    const problems = {};
    for (const p of file.problems) {
      if (p.line) {
        problems[p.line] = (problems[p.line] ? problems[p.line] + "; " : "") + p.message;
      }
    }
    const body = $("rules-lines").tBodies[0];
    body.textContent = "";
    file.lines.forEach((text, index) => {
      const row = body.insertRow();
      const n = index + 1;
      P.cell(row, n, true).className = "line-number";
      const td = P.cell(row, text);
      td.className = "line-text";
      if (problems[n]) {
        row.className = "problem-line";
        const note = document.createElement("span");
        note.className = "line-problem";
        note.textContent = "  ← " + problems[n];
        td.append(note);
      }
    });
    $("rules-lines").hidden = file.lines.length === 0;
  }

  async function loadStudies() {
    const page = await P.api("/studies?limit=100");
    const select = $("rt-study");
    const chosen = select.value;
    select.textContent = "";
    for (const s of page.studies) {
      select.add(new Option(s.short_uid + " — " + s.calling_ae + ", " + P.when(s.first_received) + ", " +
        s.series_count + " series", s.study_uid));
    }
    if (page.studies.length === 0) {
      select.add(new Option("no stored study", ""));
    }
    if ([...select.options].some((o) => o.value === chosen)) {
      select.value = chosen;
    }
    $("rules-tester").querySelector("button").disabled = page.studies.length === 0;
  }

  async function test(event) {
    event.preventDefault();
    P.clearNotices();
    const uid = $("rt-study").value;
    const table = $("rules-test");
    const body = table.tBodies[0];
    body.textContent = "";
    table.hidden = true;
    $("rules-test-summary").textContent = "";
    if (!uid) {
      return;
    }
    try {
      const ex = await P.api("/studies/" + encodeURIComponent(uid) + "/routing");
      const modality = {};
      for (const s of ex.series) {
        modality[s.series_uid] = s.modality || "–";
      }
      const firing = [];
      for (const rule of ex.rules) {
        const model = rule.model + (rule.model_version ? "@" + rule.model_version : "");
        if (rule.chosen_series) {
          firing.push(rule.rule + " (" + model + " on series " + P.shortUid(rule.chosen_series) + ")");
        }
        for (const s of rule.series) {
          const row = body.insertRow();
          P.cell(row, rule.rule, true);
          P.cell(row, model);
          P.cell(row, P.shortUid(s.series_uid)).title = "Series Instance UID " + s.series_uid;
          P.cell(row, modality[s.series_uid] || "–");
          const outcome = P.cell(row, s.chosen ? "fires: runs the model" : s.matched
            ? "matches, another series chosen" : "no match: " + s.reasons.join("; "));
          outcome.className = s.chosen ? "state state-sent" : "";
        }
        if (!rule.series.length) {
          const row = body.insertRow();
          P.cell(row, rule.rule, true);
          P.cell(row, model);
          P.cell(row, "–");
          P.cell(row, "–");
          P.cell(row, "no match: " + rule.study_reasons.join("; "));
        }
      }
      table.hidden = body.rows.length === 0;
      $("rules-test-summary").textContent = "Study " + P.shortUid(uid) + " (" + ex.series.length + " series): " +
        (ex.rules.length === 0 ? "no rules are configured." : firing.length ? firing.length +
          " rule(s) would fire: " + firing.join(", ") + "." : "no rule would fire; nothing would run.");
    } catch (err) {
      P.showError(err);
    }
  }

  async function load() {
    const [file] = await Promise.all([P.api("/rules"), loadStudies()]);
    renderFile(file);
  }

  function clear() {
    for (const id of ["rules-lines", "rules-test"]) {
      $(id).tBodies[0].textContent = "";
    }
    for (const id of ["rules-problems", "rules-warnings", "rt-study", "rules-path", "rules-verdict",
      "rules-test-summary"]) {
      $(id).textContent = "";
    }
    $("rules-test").hidden = true;
  }

  $("rules-tester").addEventListener("submit", test);

  P.registerView("rules", { permission: "status.read", load: load, clear: clear });
})();
