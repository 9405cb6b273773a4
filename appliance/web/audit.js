// Portico dashboard, Audit: search the audit trail (GET /audit/search) and export what was found as CSV
// (GET /audit/export, a plain link: the same filters). Shown only to roles with audit.read.
"use strict";

(function () {
  const P = window.Portico;
  const $ = P.$;
  const PAGE = 100;
  let before = null;

  function filters() {
    const q = new URLSearchParams();
    const actor = $("a-actor").value.trim();
    const study = $("a-study").value.trim().replace(/^…/, "");
    if (actor) {
      q.set("actor", actor);
    }
    if ($("a-event").value) {
      q.set("event", $("a-event").value);
    }
    if (study) {
      q.set("study", study);
    }
    for (const [key, id] of [["since", "a-since"], ["until", "a-until"]]) {
      const value = $(id).value;  // local date and time
      if (value) {
        q.set(key, String(new Date(value).getTime() / 1000));
      }
    }
    return q;
  }

  function summary(detail) {
    if (detail === null || detail === undefined) {
      return "";
    }
    const text = typeof detail === "string" ? detail : JSON.stringify(detail);
    return text.length > 160 ? text.slice(0, 157) + "…" : text;
  }

  async function search(more) {
    const q = filters();
    $("audit-export").href = "/audit/export" + (q.toString() ? "?" + q.toString() : "");
    q.set("limit", String(PAGE));
    if (more && before !== null) {
      q.set("before", String(before));
    }
    const page = await P.api("/audit/search?" + q.toString());
    const select = $("a-event");
    if (select.options.length === 1) {
      for (const event of page.events) {
        select.add(new Option(event.replace(/_/g, " "), event));
      }
    }
    const body = $("audit-table").tBodies[0];
    if (!more) {
      body.textContent = "";
    }
    for (const r of page.rows) {
      const row = body.insertRow();
      P.cell(row, r.id, true);
      P.cell(row, P.when(r.ts));
      P.cell(row, r.event.replace(/_/g, " "));
      P.cell(row, r.actor);
      P.cell(row, r.study_uid ? P.shortUid(r.study_uid) : "").title = r.study_uid ? "Study " + r.study_uid : "";
      P.cell(row, r.job_id === null ? "" : r.job_id);
      const td = P.cell(row, summary(r.detail));
      td.className = "detail";
      td.title = typeof r.detail === "string" ? r.detail : JSON.stringify(r.detail);
    }
    before = page.next_before;
    $("audit-more").hidden = before === null;
    $("audit-empty").hidden = body.rows.length > 0;
  }

  function clear() {
    before = null;
    $("audit-table").tBodies[0].textContent = "";
    $("audit-more").hidden = true;
    $("audit-empty").hidden = true;
  }

  $("audit-form").addEventListener("submit", (event) => {
    event.preventDefault();
    P.clearNotices();
    search(false).catch(P.showError);
  });
  $("audit-more").addEventListener("click", () => search(true).catch(P.showError));

  P.registerView("audit", { permission: "audit.read", load: () => search(false), clear: clear });
})();
