// The dashboard's only script: it sets the browser's time zone where a page has none yet,
// marks the period custom when a date is picked, and runs the opt-in live refresh.
(function () {
  "use strict";
  var zone = "UTC";
  try {
    zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
  } catch (e) {
    // an old browser: UTC
  }
  if (document.body.hasAttribute("data-needs-tz")) {
    var url = new URL(location.href);
    url.searchParams.set("tz", zone);
    location.replace(url.toString());
    return;
  }
  document.querySelectorAll("[data-browser-tz]").forEach(function (input) {
    input.value = zone;
  });
  ["start", "end"].forEach(function (id) {
    var input = document.getElementById(id);
    var period = document.getElementById("period");
    if (input && period) {
      input.addEventListener("change", function () { period.value = "custom"; });
    }
  });

  var seconds = Number(document.body.getAttribute("data-live"));
  if (!(seconds > 0)) {
    return;
  }
  function say(text) {
    var status = document.getElementById("asof");
    if (status) {
      status.textContent = text;
    }
  }
  function swap(html) {
    var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("data");
    var data = document.getElementById("data");
    if (!fresh || !data) {
      return;
    }
    // Keep what the reader opened and where the keyboard was.
    var open = Array.prototype.map.call(data.querySelectorAll("details"), function (d) {
      return d.open;
    });
    fresh.querySelectorAll("details").forEach(function (d, i) {
      d.open = Boolean(open[i]);
    });
    var focused = data.contains(document.activeElement) ? document.activeElement : null;
    var href = focused && focused.getAttribute("href");
    data.replaceWith(fresh);
    if (href) {
      var again = fresh.querySelector('[href="' + CSS.escape(href) + '"]');
      if (again) {
        again.focus();
      }
    }
  }
  function refresh() {
    if (document.hidden) {
      schedule();
      return;
    }
    fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (response.redirected) {
          location.reload(); // the session ended: show the sign-in page
          return;
        }
        if (!response.ok) {
          say("Live refresh failed (" + response.status + "); trying again in " + seconds + " s.");
          return;
        }
        return response.text().then(swap);
      })
      .catch(function () {
        say("Live refresh failed: the service did not answer; trying again in " + seconds + " s.");
      })
      .then(schedule);
  }
  function schedule() {
    setTimeout(refresh, seconds * 1000);
  }
  schedule();
})();
