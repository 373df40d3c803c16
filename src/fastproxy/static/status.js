// The status page refreshes itself every 1.5 s by fetching itself again
// and swapping in the listeners: the page is rendered in one place only
// (statuspage.py), so what a refresh shows is what a reload shows. Plain
// DOM calls, no framework: the page must work with nothing but the package.
"use strict";
(function () {
  const PERIOD_MS = 1500;

  function refresh() {
    const updated = document.getElementById("updated");
    fetch(window.location.pathname, {cache: "no-store"})
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (text) {
        const fresh = new DOMParser().parseFromString(text, "text/html").getElementById("listeners");
        if (fresh === null) throw new Error("no listeners in the page");
        const main = document.getElementById("listeners");
        main.replaceChildren.apply(main, Array.from(fresh.childNodes));
        updated.textContent = "updated " + new Date().toLocaleTimeString();
        updated.classList.remove("stale");
      })
      .catch(function (e) {
        updated.textContent = "not updated: " + e.message;
        updated.classList.add("stale");
      })
      .finally(function () { setTimeout(refresh, PERIOD_MS); });
  }
  setTimeout(refresh, PERIOD_MS);
})();
