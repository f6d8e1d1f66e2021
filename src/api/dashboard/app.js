// The bulkflow dashboard: a small single-page app over the operator API (/api/v1). No build step,
// no third-party code. The operator token is kept in this tab's sessionStorage only.
"use strict";

const TOKEN_KEY = "bulkflow-token";
const FINAL = ["PROCESSED", "ERROR", "CANCELLED"];
const app = document.getElementById("app");
const live = document.getElementById("live");
let timer = null;
// Bumped on every navigation: a refresh started for an earlier view does not draw.
let generation = 0;

const esc = (v) =>
  String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const num = (n) => (n ?? 0).toLocaleString("en-US");
const when = (t) => (t ? new Date(t).toLocaleString() : "—");
const badge = (s) => `<span class="badge ${esc(s)}">${esc(s)}</span>`;

function duration(secs) {
  if (secs == null) return "—";
  secs = Math.round(secs);
  if (secs < 60) return `${secs} s`;
  if (secs < 3600) return `${Math.floor(secs / 60)} min ${secs % 60} s`;
  return `${Math.floor(secs / 3600)} h ${Math.floor((secs % 3600) / 60)} min`;
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { Authorization: `Bearer ${token}` };
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(`/api/v1${path}`, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const e = body.error || {};
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      showLogin(e.message || "the token was refused");
    }
    throw new ApiError(response.status, e.code || "error", e.message || response.statusText);
  }
  return body;
}

function stopPolling() {
  if (timer) clearTimeout(timer);
  timer = null;
}

// Runs `refresh` now and again every `every` ms while the view is shown.
function poll(refresh, every) {
  stopPolling();
  const mine = generation;
  const tick = async () => {
    if (mine !== generation) return;
    try {
      const again = await refresh(mine);
      live.textContent = `updated ${new Date().toLocaleTimeString()}`;
      if (mine === generation) timer = setTimeout(tick, again === false ? 5000 : every);
    } catch (e) {
      if (e.status === 401) return;
      live.textContent = `update failed: ${e.message}`;
      if (mine === generation) timer = setTimeout(tick, every * 2);
    }
  };
  tick();
}

function showLogin(message) {
  stopPolling();
  generation++;
  document.getElementById("sign-out").hidden = true;
  app.innerHTML = `
    <form id="login" class="card login">
      <h1>Sign in</h1>
      <p class="muted">Enter the operator token (<code>[api] token</code> or <code>BULKFLOW_API_TOKEN</code> of this server).</p>
      <input id="token" type="password" autocomplete="current-password" placeholder="operator token" required>
      <button class="primary" type="submit">Sign in</button>
      <p id="login-error" class="error">${esc(message || "")}</p>
    </form>`;
  document.getElementById("login").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, document.getElementById("token").value.trim());
    try {
      await api("/bulk-changes?limit=1");
      route();
    } catch (e) {
      if (e.status !== 401) document.getElementById("login-error").textContent = e.message;
    }
  });
}

// A progress bar: processed (green), failed (red), cancelled (grey), out of the total.
function bar(total, processed, failed, cancelled, big) {
  const pct = (n) => (total > 0 ? (100 * n) / total : 0);
  return `<div class="bar${big ? " big" : ""}" title="${num(processed)} processed, ${num(failed)} failed, ${num(cancelled)} cancelled of ${num(total)}">
    <span class="ok" style="width:${pct(processed)}%"></span><span class="bad" style="width:${pct(failed)}%"></span><span class="off" style="width:${pct(cancelled)}%"></span></div>`;
}

// ---- the list of bulk changes ----
async function listView(query) {
  const status = query.get("status") || "";
  const before = query.get("before") || "";
  app.innerHTML = `
    <div class="row"><h1>Bulk changes</h1>
      <label>Status <select id="status-filter">
        ${["", "NEW", "PROCESSING", "PAUSED", "CANCELLING", "PROCESSED", "ERROR", "CANCELLED"]
          .map((s) => `<option value="${s}" ${s === status ? "selected" : ""}>${s || "any"}</option>`)
          .join("")}
      </select></label></div>
    <table id="bulk-list"><thead><tr><th>Id</th><th>Tenant</th><th>Status</th><th>Progress</th>
      <th class="num">Devices</th><th class="num">Processed</th><th class="num">Failed</th><th>Created</th></tr></thead>
      <tbody><tr><td colspan="8" class="muted">Loading…</td></tr></tbody></table>
    <p><button id="older" hidden>Older bulk changes</button></p>`;
  document.getElementById("status-filter").addEventListener("change", (ev) => {
    location.hash = ev.target.value ? `#/?status=${ev.target.value}` : "#/";
  });
  poll(async (mine) => {
    const params = new URLSearchParams({ limit: "50" });
    if (status) params.set("status", status);
    if (before) params.set("before", before);
    const page = await api(`/bulk-changes?${params}`);
    if (mine !== generation) return;
    const rows = page.items.map((b) => {
      const cancelled = b.cancelled || 0;
      return `<tr class="clickable" data-id="${b.bulk_change_id}" data-status="${esc(b.status)}">
        <td><a href="#/bulk/${b.bulk_change_id}">${b.bulk_change_id}</a></td><td>${b.tenant_id}</td><td>${badge(b.status)}</td>
        <td>${bar(b.total, b.processed, b.failed, cancelled)}</td>
        <td class="num">${num(b.total)}</td><td class="num">${num(b.processed)}</td><td class="num">${num(b.failed)}</td>
        <td>${when(b.created_date)}</td></tr>`;
    });
    document.querySelector("#bulk-list tbody").innerHTML =
      rows.join("") || `<tr><td colspan="8" class="muted">No bulk changes${status ? ` with status ${esc(status)}` : ""}.</td></tr>`;
    document.querySelectorAll("#bulk-list tr[data-id]").forEach((tr) =>
      tr.addEventListener("click", () => (location.hash = `#/bulk/${tr.dataset.id}`)),
    );
    const older = document.getElementById("older");
    older.hidden = !page.next_before;
    older.onclick = () => {
      const p = new URLSearchParams({ before: page.next_before });
      if (status) p.set("status", status);
      location.hash = `#/?${p}`;
    };
    return page.items.some((b) => !FINAL.includes(b.status));
  }, 2000);
}

// ---- one bulk change ----
function chart(throughput) {
  const points = throughput.points;
  if (!points.length) return `<p class="muted">No device has ended yet.</p>`;
  const bucket = throughput.bucket_seconds;
  const t0 = new Date(points[0][0]).getTime();
  const t1 = new Date(points[points.length - 1][0]).getTime();
  const slots = Math.max(1, Math.round((t1 - t0) / 1000 / bucket) + 1);
  const max = Math.max(...points.map((p) => p[1] / bucket));
  const w = 1000, h = 150, pad = 20;
  const bw = (w - 2 * pad) / slots;
  const bars = points
    .map(([t, n]) => {
      const i = Math.round((new Date(t).getTime() - t0) / 1000 / bucket);
      const rate = n / bucket;
      const bh = (rate / max) * (h - pad);
      return `<rect x="${pad + i * bw}" y="${h - bh}" width="${Math.max(1, bw - 1)}" height="${bh}"><title>${new Date(t).toLocaleTimeString()}: ${rate.toFixed(1)} devices/s</title></rect>`;
    })
    .join("");
  return `<svg id="chart" class="chart" viewBox="0 0 ${w} ${h + 20}" preserveAspectRatio="none">
    ${bars}<text x="${pad}" y="12">${max.toFixed(1)} devices/s</text>
    <text x="${pad}" y="${h + 16}">${new Date(t0).toLocaleTimeString()}</text>
    <text x="${w - pad}" y="${h + 16}" text-anchor="end">${new Date(t1).toLocaleTimeString()} (bars of ${bucket} s)</text></svg>`;
}

async function bulkView(id, query) {
  const deviceStatus = query.get("devices") || "";
  const after = query.get("after") || "";
  app.innerHTML = `
    <p><a href="#/">← Bulk changes</a></p>
    <div class="card">
      <div class="row"><div><h1>Bulk change ${esc(id)} <span id="status"></span></h1>
        <div id="details" class="muted"></div></div>
        <div class="actions">
          <button id="resume" class="primary" disabled>Resume</button>
          <button id="retry-failed" disabled>Retry failed devices</button>
          <button id="cancel" class="danger" disabled>Cancel…</button>
        </div></div>
      <div id="cancel-confirm" class="confirm" hidden>
        <p><b>Cancel this bulk change?</b> No new carrier call starts; calls in flight finish and are
        recorded; devices not finished end CANCELLED. This cannot be undone.</p>
        <input id="cancel-reason" placeholder="reason (recorded)" value="cancelled from the dashboard">
        <button id="cancel-go" class="danger">Cancel bulk change</button>
        <button id="cancel-back">Keep it running</button>
      </div>
      <p id="action-result" class="notice"></p>
      <div id="progress"></div>
      <div id="counts" class="stats"></div>
      <p id="facts" class="muted"></p>
    </div>
    <h2>Throughput</h2><div class="card" id="throughput"></div>
    <h2>Failures by reason</h2><div id="failures"></div>
    <div class="row"><h2>Devices</h2>
      <label>Status <select id="device-filter">
        ${["", "NEW", "PENDING", "PROCESSING", "PROCESSED", "API_FAILED", "CANCELLED"]
          .map((s) => `<option value="${s}" ${s === deviceStatus ? "selected" : ""}>${s || "any"}</option>`)
          .join("")}
      </select></label></div>
    <table id="devices"><thead><tr><th>Device change</th><th>ICCID</th><th>Status</th><th>Details</th>
      <th class="num">Attempts</th><th>Rev service</th></tr></thead><tbody></tbody></table>
    <p><button id="more-devices" hidden>Next devices</button></p>`;
  const result = document.getElementById("action-result");
  const act = async (path, body, done) => {
    result.className = "notice";
    result.textContent = "…";
    try {
      const r = await api(`/bulk-changes/${id}/${path}`, { method: "POST", body: body && JSON.stringify(body) });
      result.textContent = done(r);
    } catch (e) {
      result.className = "error";
      result.textContent = e.message;
    }
  };
  document.getElementById("cancel").onclick = () => (document.getElementById("cancel-confirm").hidden = false);
  document.getElementById("cancel-back").onclick = () => (document.getElementById("cancel-confirm").hidden = true);
  document.getElementById("cancel-go").onclick = async () => {
    document.getElementById("cancel-confirm").hidden = true;
    const reason = document.getElementById("cancel-reason").value || "cancelled from the dashboard";
    await act("cancel", { reason, by: "dashboard" }, () => "Cancel recorded: no new carrier call starts.");
  };
  document.getElementById("resume").onclick = () => act("resume", null, () => "Resumed and queued.");
  document.getElementById("retry-failed").onclick = () =>
    act("retry-failed", null, (r) => `${num(r.devices)} failed devices get a new round.`);
  document.getElementById("device-filter").addEventListener("change", (ev) => {
    location.hash = ev.target.value ? `#/bulk/${id}?devices=${ev.target.value}` : `#/bulk/${id}`;
  });
  let slow = 0;
  poll(async (mine) => {
    const b = await api(`/bulk-changes/${id}`);
    if (mine !== generation) return;
    const cancelled = b.cancelled || 0;
    const finished = b.processed + b.failed + cancelled;
    const final = FINAL.includes(b.status);
    document.getElementById("status").innerHTML = badge(b.status);
    document.getElementById("status").dataset.status = b.status;
    document.getElementById("details").textContent = [
      b.status_details,
      b.driving_worker ? `driven by ${b.driving_worker}` : final ? "" : "no worker drives it now",
    ].filter(Boolean).join(" · ");
    const progress = document.getElementById("progress");
    progress.innerHTML = `${bar(b.total, b.processed, b.failed, cancelled, true)}
      <p class="muted">${((100 * finished) / Math.max(1, b.total)).toFixed(1)} % · ${num(finished)} of ${num(b.total)} devices ended
      ${b.devices_per_second ? ` · ${b.devices_per_second.toFixed(1)} devices/s` : ""}${b.eta_seconds ? ` · ${duration(b.eta_seconds)} left` : ""}</p>`;
    Object.assign(progress.dataset, { finished, total: b.total, processed: b.processed, failed: b.failed, cancelled });
    const open = b.total - finished;
    document.getElementById("counts").innerHTML = [
      ["processed", b.processed], ["failed", b.failed], ["cancelled", cancelled],
      ["billing warnings", b.billing_warnings], ["not ended", open],
    ].map(([label, n]) => `<div class="stat" data-count="${label}"><b>${num(n)}</b><span>${label}</span></div>`).join("");
    document.getElementById("facts").textContent =
      `tenant ${b.tenant_id} · workflow ${b.workflow} · accepted ${when(b.created_date)} · started ${when(b.started_date)} · ended ${when(b.processed_date)}`;
    document.getElementById("resume").disabled = b.status !== "PAUSED";
    document.getElementById("cancel").disabled = final || b.status === "CANCELLING";
    document.getElementById("retry-failed").disabled = !(b.failed > 0 && ["PROCESSING", "PAUSED", "PROCESSED", "ERROR"].includes(b.status));
    // The slower parts every few seconds (and once more at the end).
    if (slow-- <= 0 || final) {
      slow = 3;
      const [throughput, failures] = await Promise.all([
        api(`/bulk-changes/${id}/throughput`),
        api(`/bulk-changes/${id}/failures`),
      ]);
      if (mine !== generation) return;
      document.getElementById("throughput").innerHTML = chart(throughput);
      document.getElementById("failures").innerHTML = failures.length
        ? `<table><thead><tr><th>Status</th><th>Reason</th><th class="num">Devices</th><th>Example</th></tr></thead><tbody>${failures
            .map((f) => `<tr><td>${badge(f.status)}</td><td>${esc(f.reason)}</td><td class="num">${num(f.devices)}</td>
              <td><a href="#/bulk/${id}/device/${f.example_device_change_id}">${f.example_device_change_id}</a></td></tr>`)
            .join("")}</tbody></table>`
        : `<p class="muted card">No failures.</p>`;
    }
    const params = new URLSearchParams({ limit: "50" });
    if (deviceStatus) params.set("status", deviceStatus);
    if (after) params.set("after", after);
    const devices = await api(`/bulk-changes/${id}/devices?${params}`);
    if (mine !== generation) return;
    document.querySelector("#devices tbody").innerHTML =
      devices.items
        .map((d) => `<tr class="clickable" data-device="${d.device_change_id}"><td><a href="#/bulk/${id}/device/${d.device_change_id}">${d.device_change_id}</a></td>
          <td>${esc(d.iccid)}</td><td>${badge(d.status)}</td><td>${esc(d.status_details)}</td><td class="num">${d.attempts}</td><td>${esc(d.rev_service_id)}</td></tr>`)
        .join("") || `<tr><td colspan="6" class="muted">No devices${deviceStatus ? ` with status ${esc(deviceStatus)}` : ""}.</td></tr>`;
    document.querySelectorAll("#devices tr[data-device]").forEach((tr) =>
      tr.addEventListener("click", () => (location.hash = `#/bulk/${id}/device/${tr.dataset.device}`)),
    );
    const more = document.getElementById("more-devices");
    more.hidden = !devices.next_after;
    more.onclick = () => {
      const p = new URLSearchParams({ after: devices.next_after });
      if (deviceStatus) p.set("devices", deviceStatus);
      location.hash = `#/bulk/${id}?${p}`;
    };
    return !final;
  }, 1000);
}

// ---- one device's timeline ----
async function deviceView(id, device) {
  app.innerHTML = `<p><a href="#/bulk/${esc(id)}">← Bulk change ${esc(id)}</a></p><div id="timeline" class="muted">Loading…</div>`;
  poll(async (mine) => {
    const t = await api(`/bulk-changes/${id}/devices/${encodeURIComponent(device)}/timeline`);
    if (mine !== generation) return;
    const calls = (cs) =>
      cs.length
        ? cs.map((c) => `<details><summary><code>${esc(c.method)} ${esc(c.url)}</code> → ${c.status ?? "no answer"} in ${c.duration_ms} ms</summary>
            ${c.request_body ? `<pre>${esc(c.request_body)}</pre>` : ""}<pre>${esc(c.response_body || c.error || "")}</pre></details>`).join("")
        : `<span class="muted">—</span>`;
    document.getElementById("timeline").outerHTML = `<div id="timeline" class="card">
      <h1>Device change ${t.device_change_id} ${badge(t.status)}</h1>
      <p class="muted">ICCID ${esc(t.iccid)}${t.msisdn ? ` · MSISDN ${esc(t.msisdn)}` : ""} · target ${esc(t.target)}${t.rev_service ? " · with a Rev service" : ""}</p>
      <table><thead><tr><th>Time</th><th>Step</th><th class="num">Attempt</th><th>Outcome</th><th>Detail</th><th>Calls</th></tr></thead><tbody>
      ${t.entries.map((e) => `<tr data-outcome="${esc(e.outcome)}"><td>${new Date(e.at).toLocaleTimeString()}</td><td>${esc(e.step)}</td>
        <td class="num">${e.attempt || ""}</td><td>${esc(e.outcome)}</td><td>${esc(e.detail)}</td><td>${calls(e.calls)}</td></tr>`).join("")}
      </tbody></table></div>`;
    return !FINAL.includes(t.status) && t.status !== "API_FAILED";
  }, 2000);
}

function route() {
  stopPolling();
  generation++;
  if (!sessionStorage.getItem(TOKEN_KEY)) return showLogin();
  document.getElementById("sign-out").hidden = false;
  const [path, q] = (location.hash.replace(/^#/, "") || "/").split("?");
  const query = new URLSearchParams(q || "");
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "bulk" && parts[1] && parts[2] === "device" && parts[3]) return deviceView(parts[1], parts[3]);
  if (parts[0] === "bulk" && parts[1]) return bulkView(parts[1], query);
  return listView(query);
}

document.getElementById("sign-out").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin();
});
window.addEventListener("hashchange", route);
route();
