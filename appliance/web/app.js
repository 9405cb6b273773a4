// Portico dashboard: plain JavaScript over the appliance's JSON API.
// Signing in gives an HttpOnly session cookie this script never sees; nothing is kept in web storage.
// Every request carries X-Requested-With (the API refuses a change from a signed-in browser without it).
// Text from the API goes into the page as text, never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  // who is signed in (GET /auth/me): { user, roles, permissions, via }
  let me = null;

  class ApiError extends Error {
    constructor(status, body) {
      const code = (body && body.code) || "http_" + status;
      const message = (body && body.message) || "the appliance answered HTTP " + status;
      super(message);
      this.status = status;
      this.code = code;
      this.requestId = (body && body.request_id) || "";
    }
  }

  function may(permission) {
    return Boolean(me && me.permissions.indexOf(permission) >= 0);
  }

  async function api(path, options) {
    const init = Object.assign({ method: "GET", cache: "no-store", credentials: "same-origin" }, options || {});
    init.headers = { Accept: "application/json", "X-Requested-With": "portico" };
    if (init.body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(init.body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, { code: "network", message: "the appliance could not be reached" });
    }
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = null;
    }
    if (!response.ok) {
      // a lockout (429) says in its message how long to wait
      throw new ApiError(response.status, body);
    }
    return body;
  }

  // --- notices -------------------------------------------------------------------------------

  function showError(err) {
    const box = $("error");
    box.textContent = "";
    const strong = document.createElement("strong");
    strong.textContent = err.code ? "Error (" + err.code + "): " : "Error: ";
    box.append(strong, document.createTextNode(err.message));
    if (err.requestId) {
      const small = document.createElement("small");
      small.textContent = " Request id " + err.requestId + ".";
      box.append(small);
    }
    box.hidden = false;
    if (err.status === 401 && me) {
      signedOut(false);
    }
  }

  function clearNotices() {
    $("error").hidden = true;
    $("error").textContent = "";
    $("confirmation").hidden = true;
    $("confirmation").textContent = "";
  }

  function announce(text) {
    $("confirmation").textContent = text;
    $("confirmation").hidden = false;
  }

  // --- formatting ----------------------------------------------------------------------------

  function shortUid(uid) {
    return uid && uid.length > 12 ? "…" + uid.slice(-12) : uid || "";
  }

  function when(seconds) {
    return seconds ? new Date(seconds * 1000).toLocaleString() : "";
  }

  function num(value, digits) {
    return value === null || value === undefined || value === "" ? "–" : Number(value).toFixed(digits);
  }

  function cell(row, text, header) {
    const td = document.createElement(header ? "th" : "td");
    if (header) {
      td.scope = "row";
    }
    td.textContent = text === null || text === undefined ? "" : String(text);
    row.append(td);
    return td;
  }

  function fillCounts(table, counts) {
    const body = table.tBodies[0];
    body.textContent = "";
    const states = Object.keys(counts || {}).sort();
    if (states.length === 0) {
      const row = body.insertRow();
      cell(row, "none", true).colSpan = 2;
    }
    for (const state of states) {
      const row = body.insertRow();
      cell(row, state, true);
      cell(row, counts[state]);
    }
  }

  // --- views ---------------------------------------------------------------------------------

  async function loadStatus() {
    const status = await api("/status");
    $("instances").textContent = status.instances;
    $("quarantined").textContent = status.quarantined;
    fillCounts($("jobs-by-state"), status.jobs);
    fillCounts($("outbox-by-state"), status.outbox);
    const body = $("recent-jobs").tBodies[0];
    body.textContent = "";
    for (const job of status.recent_jobs.slice().reverse()) {
      const row = body.insertRow();
      cell(row, job.id, true);
      cell(row, job.model);
      cell(row, job.state).className = "state state-" + String(job.state).toLowerCase();
      cell(row, job.provider || "");
      cell(row, job.error || "");
    }
  }

  function renderItem(detail) {
    const item = $("queue-item").content.firstElementChild.cloneNode(true);
    item.dataset.jobId = detail.job_id;
    item.id = "review-" + detail.job_id;
    const model = detail.model + (detail.model_version ? "@" + detail.model_version : "");
    item.querySelector("h3").textContent = "Job " + detail.job_id + ": " + model;
    const study = item.querySelector(".study");
    study.textContent = shortUid(detail.study_uid);
    study.title = "Study Instance UID " + detail.study_uid;
    item.querySelector(".finished").textContent = when(detail.finished);
    item.querySelector(".outbox").textContent = Object.entries(detail.outbox || {})
      .map(([state, n]) => n + " " + state).join(", ") || "none";

    const body = item.querySelector(".measurements tbody");
    const rows = detail.measurements || [];
    if (rows.length === 0) {
      const row = body.insertRow();
      cell(row, "No measurements in this result.", true).colSpan = 7;
    }
    for (const m of rows) {
      const row = body.insertRow();
      cell(row, m.name || "segment " + m.label, true);
      cell(row, num(m.volume_ml, 1));
      cell(row, num(m.mean, 1));
      cell(row, num(m.stddev, 1));
      cell(row, num(m.min, 0));
      cell(row, num(m.max, 0));
      cell(row, m.voxel_count === undefined ? "–" : m.voxel_count);
    }

    const viewer = item.querySelector("a.viewer");
    if (detail.viewer_url) {
      viewer.href = detail.viewer_url;
      viewer.hidden = false;
      viewer.setAttribute("aria-label", "Open job " + detail.job_id + " in the viewer");
    }
    const shown = showOverlay(item, detail.job_id);

    if (!may("review.decide")) {
      // the API refuses a decision anyway; no button is offered for one
      item.querySelector("form").remove();
      item.querySelector(".read-only").hidden = false;
      return item;
    }
    // a reviewer approves what they have seen: Approve waits for the overlay images
    shown.then(() => { item.querySelector(".approve").disabled = false; });
    const reason = item.querySelector("textarea");
    reason.id = "reason-" + detail.job_id;
    item.querySelector("label").htmlFor = reason.id;
    item.querySelector("form").addEventListener("submit", (event) => event.preventDefault());
    item.querySelector(".approve").addEventListener("click", () => decide(item, "approve"));
    item.querySelector(".reject").addEventListener("click", () => decide(item, "reject"));
    item.querySelector(".approve").setAttribute("aria-label", "Approve job " + detail.job_id);
    item.querySelector(".reject").setAttribute("aria-label", "Reject job " + detail.job_id);
    return item;
  }

  // the job's key slices with the segmentation drawn over them (PNG from the API); resolves when shown
  async function showOverlay(item, jobId) {
    const box = item.querySelector(".key-images");
    const status = item.querySelector(".overlay-status");
    let images = [];
    try {
      images = await api("/review/" + encodeURIComponent(jobId) + "/images");
    } catch (err) {
      status.textContent = "No overlay images for this result (" + err.message + "). Use the viewer link to see it.";
      return;
    }
    const loads = images.map((k) => new Promise((resolve) => {
      const img = document.createElement("img");
      img.className = "key-image";
      img.alt = "Key image " + k.number + " of job " + jobId + ": segmentation over source slice " +
        (k.slice_index + 1);
      img.addEventListener("load", () => resolve(img.naturalWidth > 0));
      img.addEventListener("error", () => resolve(false));
      img.src = k.url;
      box.append(img);
    }));
    const ok = await Promise.all(loads);
    const shownCount = ok.filter(Boolean).length;
    status.textContent = shownCount === images.length && shownCount > 0
      ? shownCount + " key slice(s): the segments in their colours, legend below each image."
      : "Some overlay images could not be loaded.";
    item.dataset.overlay = shownCount > 0 ? "shown" : "missing";
  }

  async function loadQueue() {
    const held = await api("/review?state=held");
    const details = await Promise.all(held.map((r) => api("/review/" + encodeURIComponent(r.job_id))));
    const list = $("queue-items");
    list.textContent = "";
    for (const detail of details) {
      list.append(renderItem(detail));
    }
    $("queue-empty").hidden = details.length > 0;
  }

  async function decide(item, action) {
    clearNotices();
    const jobId = item.dataset.jobId;
    const reason = item.querySelector("textarea").value.trim();
    if (action === "reject" && !reason) {
      showError({ code: "invalid_request", message: "a reason is required to reject job " + jobId + "." });
      item.querySelector("textarea").focus();
      return;
    }
    const buttons = item.querySelectorAll("button");
    buttons.forEach((b) => { b.disabled = true; });
    try {
      const outcome = await api("/review/" + encodeURIComponent(jobId) + "/" + action, {
        method: "POST",
        body: { reason: reason, retrospective: false },
      });
      item.remove();
      $("queue-empty").hidden = $("queue-items").children.length > 0;
      announce(action === "approve"
        ? "Job " + jobId + " approved: " + outcome.released + " result(s) released to PACS."
        : "Job " + jobId + " rejected: " + outcome.cancelled + " result(s) cancelled; nothing was sent.");
    } catch (err) {
      buttons.forEach((b) => { b.disabled = false; });
      showError(err);
    }
  }

  async function loadReviewed() {
    const all = await api("/review?state=all");
    const decided = all.filter((r) => ["APPROVED", "REJECTED", "WITHDRAWN"].indexOf(r.state) >= 0)
      .sort((a, b) => (b.decided_at || 0) - (a.decided_at || 0));
    const body = $("reviewed-table").tBodies[0];
    body.textContent = "";
    for (const r of decided) {
      const row = body.insertRow();
      cell(row, r.job_id, true);
      cell(row, shortUid(r.study_uid)).title = "Study Instance UID " + r.study_uid;
      cell(row, r.model + (r.model_version ? "@" + r.model_version : ""));
      cell(row, r.state + (r.held ? "" : " (retrospective)")).className = "state state-" + r.state.toLowerCase();
      cell(row, r.reviewer || "");
      cell(row, r.reason || "");
      cell(row, when(r.decided_at));
      const take = row.insertCell();
      if (r.state === "APPROVED" && may("review.decide")) {
        take.append(withdrawForm(r.job_id));
      }
    }
    $("reviewed-table").hidden = decided.length === 0;
    $("reviewed-empty").hidden = decided.length > 0;
  }

  // "Withdraw": the destinations get an IOCM rejection note for what they received (needs a reason)
  function withdrawForm(jobId) {
    const form = document.createElement("form");
    form.className = "withdraw";
    const input = document.createElement("input");
    input.type = "text";
    input.maxLength = 1000;
    input.placeholder = "reason";
    input.setAttribute("aria-label", "Reason to withdraw job " + jobId);
    const button = document.createElement("button");
    button.type = "submit";
    button.textContent = "Withdraw";
    button.setAttribute("aria-label", "Withdraw job " + jobId);
    form.append(input, button);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      clearNotices();
      const reason = input.value.trim();
      if (!reason) {
        showError({ code: "invalid_request", message: "a reason is required to withdraw job " + jobId + "." });
        input.focus();
        return;
      }
      button.disabled = true;
      try {
        const out = await api("/review/" + encodeURIComponent(jobId) + "/withdraw", {
          method: "POST", body: { reason: reason },
        });
        announce("Job " + jobId + " withdrawn: rejection note queued to " + Object.keys(out.notes).length +
          " destination(s).");
        await loadReviewed();
      } catch (err) {
        button.disabled = false;
        showError(err);
      }
    });
    return form;
  }

  // `portico rules explain` in the Status view: each rule against each series of a stored study
  async function explainRouting(event) {
    event.preventDefault();
    clearNotices();
    const study = $("routing-study").value.trim();
    const table = $("routing-table");
    const body = table.tBodies[0];
    body.textContent = "";
    table.hidden = true;
    try {
      const explanation = await api("/studies/" + encodeURIComponent(study) + "/routing");
      for (const rule of explanation.rules) {
        for (const series of rule.series) {
          const row = body.insertRow();
          cell(row, rule.rule, true);
          cell(row, rule.model + (rule.model_version ? "@" + rule.model_version : ""));
          cell(row, shortUid(series.series_uid));
          cell(row, series.chosen ? "runs the model" : series.matched ? "matched, another series chosen"
            : "no match: " + series.reasons.join("; "));
        }
        if (!rule.series.length) {
          const row = body.insertRow();
          cell(row, rule.rule, true);
          cell(row, rule.model);
          cell(row, "");
          cell(row, "no match: " + rule.study_reasons.join("; "));
        }
      }
      if (!explanation.rules.length) {
        announce("No routing rules are configured.");
      }
      table.hidden = body.rows.length === 0;
    } catch (err) {
      showError(err);
    }
  }

  // --- federated learning: this site's state and the jobs waiting for its approval -------------

  function rows(table, pairs) {
    const body = table.tBodies[0] || table.createTBody();
    body.textContent = "";
    for (const [key, value] of pairs) {
      const row = body.insertRow();
      cell(row, key, true);
      cell(row, value === null || value === undefined ? "–" : typeof value === "object" ? JSON.stringify(value)
        : String(value));
    }
  }

  async function loadFl() {
    const st = await api("/fl/status");
    $("fl-enrolled").textContent = st.enrolled ? "yes" : "no";
    $("fl-state").textContent = st.state;
    const running = st.running_jobs || [];
    $("fl-current").textContent = running.length ? running.join(", ") : "none";
    const current = running.length ? (st.jobs || {})[running[0]] : null;
    const last = current && current.last_round;
    $("fl-round").textContent = last ? String(last.round) : "–";
    $("fl-identity").textContent = st.enrolled
      ? "Site " + st.site + " of project " + st.project + " (server " + st.server + ")." : "Not enrolled.";
    const budget = (st.privacy && st.privacy.budget) || {};
    const bt = $("fl-budget").tBodies[0];
    bt.textContent = "";
    const row = bt.insertRow();
    cell(row, budget.project || "–", true);
    cell(row, num(budget.epsilon_spent || 0, 3));
    cell(row, budget.epsilon_budget === null ? "none (no noise)" : num(budget.epsilon_budget, 3));
    cell(row, budget.epsilon_left === null ? "–" : num(budget.epsilon_left, 3));
    cell(row, budget.delta);
    cell(row, budget.rounds_accounted || 0);
    $("fl-exhausted").hidden = !budget.exhausted;
    $("fl-exhausted").textContent = budget.exhausted
      ? "Budget spent: " + (budget.exhausted.reason || "") + " This site sends no more updates to the project." : "";
    const list = $("fl-pending");
    list.textContent = "";
    for (const job of st.pending_approval || []) {
      list.append(renderFlJob(job));
    }
    $("fl-empty").hidden = (st.pending_approval || []).length > 0;
  }

  function renderFlJob(job) {
    const item = $("fl-item").content.firstElementChild.cloneNode(true);
    item.id = "fl-job-" + job.job_id;
    item.dataset.jobId = job.job_id;
    item.querySelector("h3").textContent = "Job " + job.job_id + ": " + job.name;
    item.querySelector(".submitter").textContent = job.submitter;
    item.querySelector(".asked").textContent = when(job.first_seen) + " (" + job.attempts + " time(s))";
    item.querySelector(".waits").textContent = job.reason;
    // the content to approve: what `portico fl inspect --for` showed, else what was deployed here
    const review = job.review || (job.deployed && job.deployed.client_app_sha256 ? {
      trainer: job.deployed.trainer, client_app_sha256: job.deployed.client_app_sha256,
      problems: job.deployed.problems || [] } : null);
    if (review) {
      item.querySelector(".content").hidden = false;
      const trainer = Object.assign({}, review.trainer || {});
      const pairs = [["model", trainer.model], ["cohort", trainer.cohort], ["rounds", review.rounds]];
      for (const key of Object.keys(trainer).sort()) {
        if (key !== "model" && key !== "cohort") {
          pairs.push([key, trainer[key]]);
        }
      }
      if (review.server && review.server.workflow) {
        pairs.push(["server workflow", review.server.workflow]);
      }
      rows(item.querySelector("table.trainer"), pairs);
      const privacy = review.privacy || {};
      rows(item.querySelector("table.privacy"), [
        ["ε spent so far", privacy.epsilon_spent_so_far], ["ε after this job", privacy.epsilon_after_this_job],
        ["budget ε", privacy.epsilon], ["δ", privacy.delta], ["clip norm", privacy.clip_norm],
        ["noise multiplier", privacy.noise_multiplier], ["noise std", privacy.noise_std],
        ["min series / patients", [privacy.min_series, privacy.min_patients].join(" / ")],
        ["min examples per round", privacy.min_examples_per_round], ["excluded variables", privacy.exclude_vars],
        ["normalisation statistics", privacy.normalisation_statistics], ["note", privacy.note]]
        .filter(([, v]) => v !== undefined));
      item.querySelector(".hash").textContent = review.client_app_sha256;
      item.querySelector(".job-hash").textContent = review.job_sha256 || "–";
      for (const problem of review.problems || []) {
        const li = document.createElement("li");
        li.textContent = "Refused by this site: " + problem;
        item.querySelector(".problems").append(li);
      }
      item.dataset.sha256 = review.client_app_sha256;
    } else {
      item.querySelector(".no-content").hidden = false;
      item.querySelector(".job-ref").textContent = job.job_id;
    }
    if (job.decided) {
      const decided = document.createElement("p");
      decided.className = "decided state-" + job.decided.decision;
      decided.textContent = (job.decided.decision === "approved" ? "Approved" : "Rejected") + " by " +
        job.decided.actor + " " + when(job.decided.at) +
        (job.decided.client_app_sha256 ? " (content sha256 " + job.decided.client_app_sha256 + ")" : "") +
        "; the server has not asked again yet.";
      item.querySelector(".facts").after(decided);
    }
    if (!may("fl.decide")) {
      item.querySelector("form").remove();
      item.querySelector(".read-only").hidden = false;
      return item;
    }
    if (job.decided && job.decided.decision === "approved") {
      item.querySelector("form").remove();
      return item;
    }
    const reason = item.querySelector("textarea");
    reason.id = "fl-reason-" + job.job_id;
    item.querySelector("label").htmlFor = reason.id;
    const approve = item.querySelector(".approve");
    approve.disabled = !review || (review.problems || []).length > 0;
    approve.title = approve.disabled ? "Only reviewed content that the site's floor allows can be approved" : "";
    approve.setAttribute("aria-label", "Approve FL job " + job.job_id);
    item.querySelector(".reject").setAttribute("aria-label", "Reject FL job " + job.job_id);
    item.querySelector("form").addEventListener("submit", (event) => event.preventDefault());
    approve.addEventListener("click", () => decideFl(item, "approve"));
    item.querySelector(".reject").addEventListener("click", () => decideFl(item, "reject"));
    return item;
  }

  async function decideFl(item, action) {
    clearNotices();
    const jobId = item.dataset.jobId;
    const reason = item.querySelector("textarea").value.trim();
    if (action === "reject" && !reason) {
      showError({ code: "invalid_request", message: "a reason is required to reject FL job " + jobId + "." });
      item.querySelector("textarea").focus();
      return;
    }
    const body = { reason: reason };
    if (action === "approve") {
      body.content_sha256 = item.dataset.sha256;  // the content shown is the content bound
    }
    const buttons = item.querySelectorAll("button");
    buttons.forEach((b) => { b.disabled = true; });
    try {
      const made = await api("/fl/jobs/" + encodeURIComponent(jobId) + "/" + action, { method: "POST", body: body });
      announce(action === "approve"
        ? "FL job " + jobId + " approved: content sha256 " + made.client_app_sha256 + "."
        : "FL job " + jobId + " rejected.");
      await loadFl();
    } catch (err) {
      buttons.forEach((b) => { b.disabled = false; });
      showError(err);
    }
  }

  const VIEWS = { status: loadStatus, queue: loadQueue, reviewed: loadReviewed, fl: loadFl };
  // what each view reads (appliance.roles)
  const VIEW_PERMISSIONS = { status: "status.read", queue: "review.read", reviewed: "review.read",
    fl: "status.read" };
  // views added by the other scripts (overview.js, studies.js, audit.js): what to do on leaving, signing out
  const LEAVE = {};
  const CLEAR = {};

  // a view from another script: its section is #view-NAME, its tab button data-view="NAME"
  function registerView(name, view) {
    VIEWS[name] = view.load;
    VIEW_PERMISSIONS[name] = view.permission;
    if (view.leave) {
      LEAVE[name] = view.leave;
    }
    if (view.clear) {
      CLEAR[name] = view.clear;
    }
  }

  async function show(name) {
    for (const view of Object.keys(VIEWS)) {
      if (view !== name && LEAVE[view]) {
        LEAVE[view]();
      }
      $("view-" + view).hidden = view !== name;
    }
    for (const tab of document.querySelectorAll("#tabs button")) {
      if (tab.dataset.view === name) {
        tab.setAttribute("aria-current", "page");
      } else {
        tab.removeAttribute("aria-current");
      }
    }
    try {
      await VIEWS[name]();
    } catch (err) {
      showError(err);
    }
  }

  // --- signing in and out --------------------------------------------------------------------

  function signedIn(who) {
    me = who;
    $("sign-in").hidden = true;
    $("tabs").hidden = false;
    $("who").hidden = false;
    $("who-name").textContent = "Signed in as " + who.user;
    $("who-roles").textContent = "(" + who.roles.join(", ") + ")";
    // views the roles cannot read are not offered (the API refuses them anyway)
    for (const tab of document.querySelectorAll("#tabs button")) {
      tab.hidden = !may(VIEW_PERMISSIONS[tab.dataset.view]);
    }
  }

  function signedOut(clear) {
    me = null;
    for (const view of Object.keys(VIEWS)) {
      $("view-" + view).hidden = true;
      if (LEAVE[view]) {
        LEAVE[view]();
      }
      if (CLEAR[view]) {
        CLEAR[view]();
      }
    }
    // nothing fetched while signed in stays on the page
    $("queue-items").textContent = "";
    $("fl-pending").textContent = "";
    $("fl-budget").tBodies[0].textContent = "";
    for (const id of ["jobs-by-state", "outbox-by-state", "recent-jobs", "reviewed-table"]) {
      $(id).tBodies[0].textContent = "";
    }
    $("routing-table").tBodies[0].textContent = "";
    $("routing-table").hidden = true;
    $("instances").textContent = "";
    $("quarantined").textContent = "";
    $("tabs").hidden = true;
    $("who").hidden = true;
    $("who-name").textContent = "";
    $("who-roles").textContent = "";
    $("sign-in").hidden = false;
    $("password").value = "";
    if (clear) {
      clearNotices();
    }
  }

  $("routing-form").addEventListener("submit", explainRouting);

  // A confirmation before a change: resolves to the reason given (or "" when none is asked), or null when
  // cancelled (Cancel, Escape). Keyboard: the dialog is modal, focus starts in it and returns afterwards.
  function confirmChange(options) {
    const dialog = $("confirm-dialog");
    const reason = $("confirm-reason");
    const back = document.activeElement;
    $("confirm-title").textContent = options.title;
    $("confirm-text").textContent = options.text;
    $("confirm-ok").textContent = options.confirm;
    $("confirm-reason-box").hidden = !options.reason;
    reason.value = "";
    return new Promise((resolve) => {
      function done(value) {
        $("confirm-form").removeEventListener("submit", onSubmit);
        $("confirm-cancel").removeEventListener("click", onCancel);
        dialog.removeEventListener("cancel", onCancel);
        if (dialog.open) {
          dialog.close();
        }
        if (back && back.isConnected) {
          back.focus();
        }
        resolve(value);
      }
      function onSubmit(event) {
        event.preventDefault();
        const text = reason.value.trim();
        if (options.reason && !text) {
          reason.setAttribute("aria-invalid", "true");
          reason.focus();
          return;
        }
        reason.removeAttribute("aria-invalid");
        done(options.reason ? text : "");
      }
      function onCancel(event) {
        event.preventDefault();
        done(null);
      }
      $("confirm-form").addEventListener("submit", onSubmit);
      $("confirm-cancel").addEventListener("click", onCancel);
      dialog.addEventListener("cancel", onCancel);
      dialog.showModal();
      (options.reason ? reason : $("confirm-cancel")).focus();
    });
  }

  // what the other scripts of the dashboard use (they load after this one, before the page is ready)
  window.Portico = Object.freeze({
    $: $, api: api, may: may, cell: cell, shortUid: shortUid, when: when, fillCounts: fillCounts,
    showError: showError, announce: announce, clearNotices: clearNotices, registerView: registerView,
    show: (name) => show(name), confirmChange: confirmChange,
  });

  async function onSignOut() {
    clearNotices();
    try {
      await api("/auth/logout", { method: "POST" });
    } catch (err) {
      // the session is gone either way once the server or its idle limit ends it
    }
    signedOut(true);
    announce("Signed out.");
  }

  async function onSignIn(event) {
    event.preventDefault();
    clearNotices();
    const username = $("username").value.trim();
    const password = $("password").value;
    if (!username || !password) {
      showError({ code: "invalid_request", message: "enter your user name and password." });
      return;
    }
    let who;
    try {
      who = await api("/auth/login", { method: "POST", body: { username: username, password: password } });
    } catch (err) {
      showError(err);
      return;
    } finally {
      $("password").value = "";
    }
    signedIn(who);
    await show(firstView());
  }

  function firstView() {
    return Object.keys(VIEWS).find((view) => may(VIEW_PERMISSIONS[view])) || "status";
  }

  document.addEventListener("DOMContentLoaded", async () => {
    $("sign-in-form").addEventListener("submit", onSignIn);
    $("sign-out").addEventListener("click", onSignOut);
    for (const tab of document.querySelectorAll("#tabs button")) {
      tab.addEventListener("click", () => { clearNotices(); show(tab.dataset.view); });
    }
    for (const button of document.querySelectorAll("[data-refresh]")) {
      button.addEventListener("click", () => { clearNotices(); show(button.dataset.refresh); });
    }
    try {  // a session from before a reload is still good until it ends
      signedIn(await api("/auth/me"));
      await show(firstView());
    } catch (err) {
      if (err.status !== 401) {
        showError(err);
      }
    }
  });
})();
