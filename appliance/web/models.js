// Portico dashboard, Models (GET /models): installed versions with role, signature and accepted inputs; the
// model card (GET /models/{name}/{version}/card), Markdown drawn as elements holding text (never as HTML);
// promote, enable and disable after a confirmation where the role may (models.manage).
"use strict";

(function () {
  const P = window.Portico;
  const $ = P.$;
  const SIGNATURE = { verified: "✓ verified", invalid: "✗ does not verify", unchecked: "signed, not checked",
    unsigned: "unsigned" };

  // --- the model card: a small Markdown subset, every piece of text set as text ------------------

  function inline(parent, text) {
    // `code` and **strong**; anything else (links, HTML) stays literal text
    const parts = text.split(/(`[^`]+`|\*\*[^*]+\*\*)/);
    for (const part of parts) {
      if (part.length > 2 && part.startsWith("`") && part.endsWith("`")) {
        const code = document.createElement("code");
        code.textContent = part.slice(1, -1);
        parent.append(code);
      } else if (part.length > 4 && part.startsWith("**") && part.endsWith("**")) {
        const strong = document.createElement("strong");
        strong.textContent = part.slice(2, -2);
        parent.append(strong);
      } else if (part) {
        parent.append(document.createTextNode(part));
      }
    }
  }

  function renderMarkdown(box, text) {
    box.textContent = "";
    const lines = text.replace(/\r\n?/g, "\n").split("\n");
    let para = null;
    let list = null;
    let i = 0;
    const close = () => { para = null; list = null; };
    while (i < lines.length) {
      const line = lines[i];
      if (/^\s*```/.test(line)) {  // a fenced block, kept as it is
        close();
        const pre = document.createElement("pre");
        const body = [];
        i += 1;
        while (i < lines.length && !/^\s*```/.test(lines[i])) {
          body.push(lines[i]);
          i += 1;
        }
        pre.textContent = body.join("\n");
        box.append(pre);
        i += 1;
        continue;
      }
      const heading = /^(#{1,6})\s+(.*)$/.exec(line);
      const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
      const numbered = /^\s*\d+[.)]\s+(.*)$/.exec(line);
      if (!line.trim()) {
        close();
      } else if (heading) {
        close();
        // the card's headings sit below the page's own (h3 is the card's title)
        const h = document.createElement("h" + Math.min(6, heading[1].length + 3));
        inline(h, heading[2]);
        box.append(h);
      } else if (bullet || numbered) {
        const kind = bullet ? "UL" : "OL";
        if (!list || list.tagName !== kind) {
          para = null;
          list = document.createElement(kind.toLowerCase());
          box.append(list);
        }
        const li = document.createElement("li");
        inline(li, (bullet || numbered)[1]);
        list.append(li);
      } else if (/^\s*\|/.test(line)) {  // a table row: shown as the text it is
        close();
        const pre = document.createElement("pre");
        const rows = [];
        while (i < lines.length && /^\s*\|/.test(lines[i])) {
          rows.push(lines[i]);
          i += 1;
        }
        pre.textContent = rows.join("\n");
        box.append(pre);
        continue;
      } else {
        list = null;
        if (!para) {
          para = document.createElement("p");
          box.append(para);
        } else {
          para.append(document.createTextNode(" "));
        }
        inline(para, line.trim());
      }
      i += 1;
    }
  }

  async function showCard(m) {
    P.clearNotices();
    const card = await P.api("/models/" + encodeURIComponent(m.name) + "/" + encodeURIComponent(m.version) + "/card");
    $("model-card-box").hidden = false;
    $("model-card-title").textContent = "Model card: " + m.name + "@" + m.version;
    $("model-card-note").textContent = card.file + (card.intact ? ", as signed for in the package's manifest"
      : ": DOES NOT MATCH the package's manifest (changed after packaging)") +
      (card.truncated ? "; only its first 256 KiB are shown" : "") + ".";
    $("model-card-note").className = card.intact ? "hint" : "notice error";
    renderMarkdown($("model-card"), card.text);
    $("model-card-title").focus();
  }

  // --- changes ---------------------------------------------------------------------------------

  const ACTIONS = {
    promote: {
      verb: "Promote",
      text: (m) => m.name + "@" + m.version + " becomes the active version: it runs for every rule that names no " +
        "version of " + m.name + ", and the version active now becomes a candidate. It is verified first.",
      done: (m, out) => m.name + "@" + m.version + " is active" + (out.previous ? "; " + out.previous +
        " is a candidate now." : "."),
    },
    disable: {
      verb: "Disable",
      text: (m) => m.name + "@" + m.version + " will not run at all, pinned or not" +
        (m.role === "active" ? ": it is the active version, so rules naming no version of " + m.name +
          " get no result until another version is promoted" : "") + ".",
      done: (m) => m.name + "@" + m.version + " is disabled.",
    },
    enable: {
      verb: "Enable",
      text: (m) => m.name + "@" + m.version + " may run again (as " + m.role + "). It is verified first.",
      done: (m) => m.name + "@" + m.version + " is enabled.",
    },
  };

  async function change(m, action) {
    P.clearNotices();
    const a = ACTIONS[action];
    const ok = await P.confirmChange({ title: a.verb + " " + m.name + "@" + m.version + "?", text: a.text(m),
      confirm: a.verb, reason: false });
    if (ok === null) {
      return;
    }
    try {
      const out = await P.api("/models/" + encodeURIComponent(m.name) + "/" + encodeURIComponent(m.version) + "/" +
        action, { method: "POST" });
      await load();
      P.announce(a.done(m, out));
    } catch (err) {
      P.showError(err);
    }
  }

  function actionButton(m, action) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "inline";
    b.textContent = ACTIONS[action].verb;
    b.setAttribute("aria-label", ACTIONS[action].verb + " " + m.name + "@" + m.version);
    b.addEventListener("click", () => change(m, action));
    return b;
  }

  function accepts(input) {
    if (!input) {
      return "–";
    }
    const parts = [input.modality + (input.body_parts.length ? " (" + input.body_parts.join(", ") + ")" : ""),
      input.orientation, "≥ " + input.min_slices + " slices"];
    if (input.slice_spacing_mm) {
      parts.push("slice spacing " + input.slice_spacing_mm.join("–") + " mm");
    }
    if (input.pixel_spacing_mm) {
      parts.push("pixel spacing " + input.pixel_spacing_mm.join("–") + " mm");
    }
    if (input.spacing_mm) {
      parts.push("resampled to " + input.spacing_mm.join(" × ") + " mm");
    }
    return parts.join("; ");
  }

  async function load() {
    const models = await P.api("/models");
    const body = $("models-table").tBodies[0];
    body.textContent = "";
    const manage = P.may("models.manage");
    for (const m of models) {
      const row = body.insertRow();
      row.dataset.model = m.name + "@" + m.version;
      const th = P.cell(row, m.title ? m.name + " (" + m.title + ")" : m.name, true);
      th.title = m.description || "";
      P.cell(row, m.version);
      P.cell(row, m.role + (m.recorded ? "" : " (default)")).className = "state state-" + m.role;
      P.cell(row, m.enabled ? "yes" : "no").className = m.enabled ? "" : "state state-failed";
      const sig = m.signature;
      const sigCell = P.cell(row, sig ? SIGNATURE[sig.state] || sig.state : "–");
      if (sig) {
        sigCell.title = sig.detail + (sig.signed_by ? " (key " + sig.signed_by + ")" : "");
        sigCell.className = sig.state === "invalid" ? "state state-failed" : sig.state === "verified" ? "state state-sent"
          : "";
      }
      P.cell(row, m.installed ? accepts(m.input) : "not installed (its folder is gone)");
      P.cell(row, m.segments.join(", ") || "–");
      const actions = row.insertCell();
      actions.className = "actions-cell";
      if (m.installed) {
        const card = document.createElement("button");
        card.type = "button";
        card.className = "inline";
        card.textContent = "Model card";
        card.setAttribute("aria-label", "Model card of " + m.name + "@" + m.version);
        card.addEventListener("click", () => showCard(m).catch(P.showError));
        actions.append(card);
      }
      if (manage) {
        if (m.installed && m.enabled && m.role !== "active") {
          actions.append(actionButton(m, "promote"));
        }
        if (m.enabled) {
          actions.append(actionButton(m, "disable"));
        } else if (m.installed) {
          actions.append(actionButton(m, "enable"));
        }
      }
    }
    $("models-empty").hidden = models.length > 0;
    $("models-table").hidden = models.length === 0;
    $("models-read-only").hidden = manage;
  }

  function clear() {
    $("models-table").tBodies[0].textContent = "";
    $("model-card").textContent = "";
    $("model-card-title").textContent = "";
    $("model-card-box").hidden = true;
  }

  P.registerView("models", { permission: "models.read", load: load, clear: clear });
})();
