// The status page refreshes itself from /stats every 1.5 s. Plain DOM
// calls, no framework: the page must work with nothing but the package.
"use strict";
(function () {
  const PERIOD_MS = 1500;

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let v = n, i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return i === 0 ? v + " B" : v.toFixed(1) + " " + units[i];
  }

  function cell(cls, text) {
    const td = document.createElement("td");
    td.className = cls;
    td.textContent = text;
    return td;
  }

  const REFUSALS = ["rejected", "queue_timeouts", "denied", "rate_limited", "outside_window",
                    "proxy_header_errors", "hook_refused"];

  function row(name, up) {
    const weight = up.weight;   // the run-time weight (drain and set_weight show at once)
    const tr = document.createElement("tr");
    tr.className = "upstream";
    tr.dataset.upstream = name;
    tr.dataset.weight = weight === undefined ? "" : weight;
    tr.append(cell("name", name), cell("state state-" + up.state, up.state), cell("health", up.health),
              cell("weight", weight === undefined ? "" : weight), cell("num active", up.active),
              cell("num total", up.accepted), cell("num up", bytes(up.bytes_upstream)),
              cell("num down", bytes(up.bytes_downstream)), cell("num failures", up.connect_failures));
    return tr;
  }

  function totals(fig) {
    const tr = document.createElement("tr");
    tr.className = "total";
    tr.append(cell("name", "listener total"), cell("", ""), cell("", ""), cell("", ""),
              cell("num active", fig.active), cell("num total", fig.accepted),
              cell("num up", bytes(fig.bytes_upstream)), cell("num down", bytes(fig.bytes_downstream)),
              cell("num failures", fig.connect_failures));
    return tr;
  }

  function section(name, fig) {
    const sec = document.createElement("section");
    sec.className = "listener";
    sec.dataset.listener = name;
    const h = document.createElement("h2");
    h.textContent = name;
    const p = document.createElement("p");
    p.className = "summary";
    const refused = REFUSALS.reduce(function (s, k) { return s + (fig[k] || 0); }, 0);
    p.textContent = "queued " + fig.queued + " \u00b7 peak " + fig.peak_active + " \u00b7 refused " + refused;
    const table = document.createElement("table");
    const head = table.createTHead().insertRow();
    ["upstream", "state", "health", "weight", "active", "total", "bytes up", "bytes down", "failures"]
      .forEach(function (t) { const th = document.createElement("th"); th.textContent = t; head.append(th); });
    const body = table.createTBody();
    Object.keys(fig.upstreams || {}).forEach(function (u) { body.append(row(u, fig.upstreams[u])); });
    body.append(totals(fig));
    sec.append(h, p, table);
    return sec;
  }

  function refresh() {
    const updated = document.getElementById("updated");
    fetch("/stats", {cache: "no-store"})
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (stats) {
        const main = document.getElementById("listeners");
        const fresh = Object.keys(stats.listeners).map(function (n) { return section(n, stats.listeners[n]); });
        main.replaceChildren.apply(main, fresh);
        updated.textContent = "updated " + new Date().toLocaleTimeString();
        updated.classList.remove("stale");
      })
      .catch(function (e) {
        updated.textContent = "not updated: " + e.message;
        updated.classList.add("stale");
      })
      .finally(function () { setTimeout(refresh, PERIOD_MS); });
  }
  refresh();
})();
