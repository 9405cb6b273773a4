// Portico dashboard, Destinations and peers (GET /destinations): outbox, TLS and reachability per destination,
// C-ECHO on demand (POST /destinations/{name}/echo, /peers/{ae}/echo), one destination's outbox
// (GET /destinations/{name}/outbox), and pause/resume where the role may (destinations.manage).
"use strict";

(function () {
  const P = window.Portico;
  const $ = P.$;
  const PAGE = 25;
  let shown = null;  // the destination whose outbox is open, if any
  let offset = 0;
  const reach = {};  // the last check of each target this page made: "destination:NAME" or "peer:AE"

  function button(text, label, onClick) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "inline";
    b.textContent = text;
    b.setAttribute("aria-label", label);
    b.addEventListener("click", () => onClick(b));
    return b;
  }

  function tlsText(tls) {
    if (!tls) {
      return "–";
    }
    const files = tls.files || [];
    const soonest = files.flatMap((f) => f.certificates).reduce((m, c) => Math.min(m, c.days_left), Infinity);
    const problem = files.find((f) => f.problem);
    let text = tls.mode === "off" ? "off" : tls.mode;
    if (problem) {
      text += " (" + problem.setting + ": " + problem.problem + ")";
    } else if (soonest !== Infinity) {
      text += soonest < 0 ? " (a certificate has expired)" : " (certificates valid " + soonest + " more days)";
    }
    return text;
  }

  function reachCell(td, key) {
    const r = reach[key];
    td.textContent = "";
    if (!r) {
      td.textContent = "not checked";
      td.className = "muted";
      return;
    }
    td.className = r.ok ? "reach-ok" : "reach-bad";
    td.textContent = (r.ok ? "✓ " : "✗ ") + r.method + ": " + r.detail + " (" + P.when(r.at) + ", " +
      r.seconds.toFixed(2) + " s)";
  }

  async function check(kind, name, b, td) {
    P.clearNotices();
    b.disabled = true;
    td.textContent = "checking…";
    try {
      const path = kind === "peer" ? "/peers/" : "/destinations/";
      const r = await P.api(path + encodeURIComponent(name) + "/echo", { method: "POST" });
      reach[kind + ":" + name] = r;
      P.announce((kind === "peer" ? "Peer " : "Destination ") + name + (r.ok ? " answers." : " does not answer: " +
        r.detail));
    } catch (err) {
      P.showError(err);
    } finally {
      b.disabled = false;
      reachCell(td, kind + ":" + name);
    }
  }

  async function pause(d) {
    P.clearNotices();
    const reason = await P.confirmChange({
      title: "Pause " + d.name + "?",
      text: "Nothing more is sent to " + d.name + " until it is resumed; its results wait in the outbox (" +
        ((d.outbox.states || {}).PENDING || 0) + " waiting now). Anything already on its way still arrives.",
      confirm: "Pause " + d.name, reason: true,
    });
    if (reason === null) {
      return;
    }
    try {
      const out = await P.api("/destinations/" + encodeURIComponent(d.name) + "/pause", {
        method: "POST", body: { reason: reason } });
      await load();
      P.announce("Destination " + d.name + " paused; " + out.waiting + " result(s) wait for it.");
    } catch (err) {
      P.showError(err);
    }
  }

  async function resume(d) {
    P.clearNotices();
    const answer = await P.confirmChange({
      title: "Resume " + d.name + "?",
      text: "Paused by " + d.paused.actor + " " + P.when(d.paused.paused_at) + " (" + d.paused.reason + "). " +
        "Resuming sends what waits, overdue items at once.",
      confirm: "Resume " + d.name, reason: false,
    });
    if (answer === null) {
      return;
    }
    try {
      const out = await P.api("/destinations/" + encodeURIComponent(d.name) + "/resume", { method: "POST" });
      await load();
      P.announce("Destination " + d.name + " resumed; " + out.waiting + " result(s) will be sent.");
    } catch (err) {
      P.showError(err);
    }
  }

  function renderDestinations(page) {
    const body = $("destinations-table").tBodies[0];
    body.textContent = "";
    const manage = P.may("destinations.manage");
    for (const d of page.destinations) {
      const row = body.insertRow();
      row.dataset.destination = d.name;
      P.cell(row, d.name + (d.configured ? "" : " (not configured)"), true);
      P.cell(row, d.address ? d.kind + " " + d.address : "–").className = "address";
      const state = P.cell(row, d.paused ? "paused" : d.configured ? "sending" : "never: unknown destination");
      state.className = d.paused ? "state state-paused" : d.configured ? "state state-sent" : "state state-failed";
      if (d.paused) {
        state.title = "Paused by " + d.paused.actor + " " + P.when(d.paused.paused_at) + ": " + d.paused.reason;
        state.textContent = "paused by " + d.paused.actor + ": " + d.paused.reason;
      }
      const states = d.outbox.states || {};
      P.cell(row, Object.keys(states).sort().map((s) => states[s] + " " + s.toLowerCase()).join(", ") || "empty");
      P.cell(row, P.when(d.outbox.last_sent) || "never");
      P.cell(row, d.outbox.last_error || "");
      P.cell(row, P.when(d.outbox.next_retry_at));
      P.cell(row, tlsText(d.tls));
      const reachTd = P.cell(row, "");
      reachCell(reachTd, "destination:" + d.name);
      const actions = row.insertCell();
      actions.className = "actions-cell";
      if (d.echo) {
        actions.append(button("Check", "Check " + d.name, (b) => check("destination", d.name, b, reachTd)));
      }
      actions.append(button("Outbox", "Outbox of " + d.name, () => openOutbox(d).catch(P.showError)));
      if (manage && d.configured) {
        actions.append(d.paused ? button("Resume", "Resume " + d.name, () => resume(d))
          : button("Pause", "Pause " + d.name, () => pause(d)));
      }
    }
    if (page.destinations.length === 0) {
      P.cell(body.insertRow(), "No destination is configured (dispatch.destinations).", true).colSpan = 10;
    }
    $("destinations-read-only").hidden = manage;
  }

  function renderPeers(page) {
    const body = $("peers-table").tBodies[0];
    body.textContent = "";
    for (const p of page.peers) {
      const row = body.insertRow();
      P.cell(row, p.ae_title, true);
      P.cell(row, p.hosts.join(", "));
      P.cell(row, p.studies);
      P.cell(row, P.when(p.last_received) || "never");
      P.cell(row, p.query || "not queried");
      P.cell(row, tlsText(p.tls) + (p.tls.binding ? "; must present " + p.tls.binding : ""));
      const td = P.cell(row, "");
      if (p.query) {
        const span = document.createElement("span");
        reachCell(span, "peer:" + p.ae_title);
        td.append(span, " ", button("Check", "Check peer " + p.ae_title, (b) => check("peer", p.ae_title, b, span)));
      } else {
        td.textContent = "sends to us only";
        td.className = "muted";
      }
    }
    if (page.peers.length === 0) {
      P.cell(body.insertRow(), "No peer is configured (router.peers).", true).colSpan = 7;
    }
  }

  function renderCertificates(d) {
    const body = $("dest-certs").tBodies[0];
    body.textContent = "";
    const files = (d.tls && d.tls.files) || [];
    for (const f of files) {
      if (f.problem) {
        const row = body.insertRow();
        P.cell(row, f.setting, true);
        P.cell(row, f.path + ": " + f.problem).colSpan = 3;
        continue;
      }
      for (const c of f.certificates) {
        const row = body.insertRow();
        P.cell(row, f.setting, true);
        P.cell(row, c.subject);
        P.cell(row, c.issuer);
        const until = P.cell(row, P.when(c.not_after) + (c.valid_now ? " (" + c.days_left + " days)" : " (not valid now)"));
        until.className = c.valid_now && c.days_left >= 30 ? "" : "state-failed";
      }
      if (f.more) {
        P.cell(body.insertRow(), "… and " + f.more + " more in " + f.path, true).colSpan = 4;
      }
    }
    if (body.rows.length === 0) {
      P.cell(body.insertRow(), "No certificate is involved (the link is not encrypted, or uses the system's CAs).",
        true).colSpan = 4;
    }
  }

  async function loadOutbox() {
    const q = new URLSearchParams({ limit: String(PAGE), offset: String(offset) });
    if ($("do-state").value) {
      q.set("state", $("do-state").value);
    }
    const page = await P.api("/destinations/" + encodeURIComponent(shown.name) + "/outbox?" + q.toString());
    const body = $("dest-outbox").tBodies[0];
    body.textContent = "";
    for (const o of page.items) {
      const row = body.insertRow();
      P.cell(row, o.id, true);
      P.cell(row, P.shortUid(o.study_uid)).title = "Study Instance UID " + o.study_uid;
      P.cell(row, o.job_id);
      P.cell(row, P.shortUid(o.sop_instance_uid)).title = "SOP Instance UID " + o.sop_instance_uid;
      P.cell(row, o.state).className = "state state-" + o.state.toLowerCase();
      P.cell(row, o.attempts);
      P.cell(row, o.last_error || "");
      P.cell(row, P.when(o.created));
      P.cell(row, o.state === "PENDING" ? P.when(o.next_attempt_at) || "now" : "");
      P.cell(row, P.when(o.sent_at));
    }
    if (page.items.length === 0) {
      P.cell(body.insertRow(), "Nothing in the outbox for " + shown.name + ".", true).colSpan = 10;
    }
    const last = page.offset + page.items.length;
    $("dest-range").textContent = page.total ? (page.offset + 1) + "–" + last + " of " + page.total : "none";
    $("dest-outbox-caption").textContent = "Outbox of " + shown.name + ", newest first (" + page.total + ")";
    $("dest-prev").disabled = page.offset === 0;
    $("dest-next").disabled = last >= page.total;
  }

  async function openOutbox(d) {
    P.clearNotices();
    shown = d;
    offset = 0;
    $("dest-detail").hidden = false;
    $("dest-detail-title").textContent = "Destination " + d.name;
    $("dest-tls-summary").textContent = d.tls ? "TLS: " + d.tls.summary +
      (d.tls.server_name ? "; its certificate must name " + d.tls.server_name : "") +
      (d.tls.auth ? "; credentials: " + d.tls.auth : "") : "Not configured: nothing is sent to it.";
    renderCertificates(d);
    await loadOutbox();
    $("dest-detail-title").focus();
  }

  async function load() {
    const page = await P.api("/destinations");
    $("dest-calling").textContent = page.calling_ae;
    renderDestinations(page);
    renderPeers(page);
    if (shown) {
      shown = page.destinations.find((d) => d.name === shown.name) || null;
      $("dest-detail").hidden = !shown;
      if (shown) {
        renderCertificates(shown);
        await loadOutbox();
      }
    }
  }

  function clear() {
    shown = null;
    offset = 0;
    for (const key of Object.keys(reach)) {
      delete reach[key];
    }
    for (const id of ["destinations-table", "peers-table", "dest-certs", "dest-outbox"]) {
      $(id).tBodies[0].textContent = "";
    }
    $("dest-detail").hidden = true;
    $("dest-calling").textContent = "";
  }

  $("dest-outbox-filter").addEventListener("submit", (event) => {
    event.preventDefault();
    P.clearNotices();
    offset = 0;
    loadOutbox().catch(P.showError);
  });
  $("dest-prev").addEventListener("click", () => {
    offset = Math.max(0, offset - PAGE);
    loadOutbox().catch(P.showError);
  });
  $("dest-next").addEventListener("click", () => {
    offset += PAGE;
    loadOutbox().catch(P.showError);
  });

  P.registerView("destinations", { permission: "status.read", load: load, clear: clear });
})();
