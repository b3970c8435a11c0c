#!/usr/bin/env python3
"""Checks that a moecert report.html renders in headless Chromium.

    scripts/check_report.py REPORT.html [--expect-plots N] [--screenshot OUT.png]

1. Loads a copy of the report with a probe script injected into <head> (the report
   itself has no scripts) and dumps the DOM after the load event. The probe records
   every script error, failed resource and console.error, and for every <figure> the
   rendered size of its SVG plot and how many marks (paths, polygons, ...) it drew.
2. Takes a screenshot of the unmodified report and checks that it is a PNG of the
   requested size that is not blank.

Exit codes: 0 the page rendered with all its plots; 1 a check failed (each failure is
printed); 2 bad usage or no report file; 77 Chromium is not installed (CTest: skipped).
Only the Python standard library is used.
"""
import argparse
import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib

PROBE = """<script>
(function () {
  var errors = [];
  window.addEventListener('error', function (e) {
    var t = e.target;
    if (t && t !== window && (t.src || t.href)) errors.push('resource failed: ' + (t.src || t.href));
    else errors.push('script error: ' + (e.message || '?'));
  }, true);
  window.addEventListener('unhandledrejection', function (e) { errors.push('unhandled rejection: ' + e.reason); });
  var consoleError = console.error;
  console.error = function () {
    errors.push('console.error: ' + Array.prototype.join.call(arguments, ' '));
    consoleError.apply(console, arguments);
  };
  window.addEventListener('load', function () {
    var figures = document.querySelectorAll('figure'), plots = [];
    for (var i = 0; i < figures.length; ++i) {
      var svg = figures[i].querySelector('svg');
      var box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
      var marks = svg ? svg.querySelectorAll('path, polyline, polygon, rect, circle, line, use').length : 0;
      plots.push({id: figures[i].id, width: box.width, height: box.height, marks: marks});
    }
    var broken = [];
    for (var j = 0; j < document.images.length; ++j) {
      var img = document.images[j];
      if (!img.complete || img.naturalWidth === 0) broken.push(img.src);
    }
    var out = document.createElement('pre');
    out.id = 'moecert-check';
    out.textContent = JSON.stringify({plots: plots, broken_images: broken, errors: errors,
                                      title: document.title, text_length: document.body.innerText.length});
    document.body.appendChild(out);
  });
})();
</script>"""

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--hide-scrollbars", "--mute-audio", "--disable-extensions"]


def find_chromium(explicit):
    candidates = [explicit] if explicit else [os.environ.get("MOECERT_CHROMIUM"), "chromium",
                                              "chromium-browser", "google-chrome"]
    for c in candidates:
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def run_chromium(chromium, args, profile, timeout):
    cmd = [chromium] + CHROMIUM_FLAGS + ["--user-data-dir=" + profile] + args
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, text=True)


def png_pixels(path):
    """(width, height, rows of RGB(A) bytes) of an 8-bit truecolour PNG (what Chromium writes)."""
    data = open(path, "rb").read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", chunk[:10])
            if depth != 8 or colour not in (2, 6):
                raise ValueError("unexpected PNG format (depth %d, colour type %d)" % (depth, colour))
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows, prev = [], bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = line[x - channels] if x >= channels else 0
            b = prev[x]
            c = prev[x - channels] if x >= channels else 0
            if f == 1:
                line[x] = (line[x] + a) & 255
            elif f == 2:
                line[x] = (line[x] + b) & 255
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    return width, height, channels, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("report")
    ap.add_argument("--expect-plots", type=int, default=0, help="exact number of plots (0: at least one)")
    ap.add_argument("--screenshot", help="write a PNG screenshot of the report here")
    ap.add_argument("--size", default="1200,3600", help="screenshot window size WIDTH,HEIGHT")
    ap.add_argument("--chromium", help="browser binary (default: chromium on PATH)")
    ap.add_argument("--timeout", type=int, default=120)
    a = ap.parse_args()
    if not os.path.isfile(a.report):
        print("check_report: no such file: %s" % a.report, file=sys.stderr)
        return 2
    chromium = find_chromium(a.chromium)
    if not chromium:
        print("check_report: chromium not found (apt-get install chromium); skipped", file=sys.stderr)
        return 77
    failures = []
    source = open(a.report, encoding="utf-8").read()
    with tempfile.TemporaryDirectory() as tmp:
        probed = os.path.join(tmp, "probed.html")
        with open(probed, "w", encoding="utf-8") as f:
            f.write(source.replace("<head>", "<head>" + PROBE, 1))
        r = run_chromium(chromium, ["--virtual-time-budget=10000", "--dump-dom", "file://" + probed],
                         os.path.join(tmp, "profile-dom"), a.timeout)
        m = re.search(r'<pre id="moecert-check">(.*?)</pre>', r.stdout, re.S)
        if r.returncode != 0 or not m:
            failures.append("chromium did not render the page (exit %d): %s" % (r.returncode, r.stderr[-2000:]))
        else:
            probe = json.loads(html.unescape(m.group(1)))
            plots = probe["plots"]
            print("rendered: title %r, %d characters of text, %d plots" %
                  (probe["title"], probe["text_length"], len(plots)))
            if a.expect_plots and len(plots) != a.expect_plots:
                failures.append("expected %d plots, found %d" % (a.expect_plots, len(plots)))
            if not plots:
                failures.append("no plots in the page")
            for p in plots:
                print("  plot %-26s %4.0f x %3.0f px, %4d marks" % (p["id"], p["width"], p["height"], p["marks"]))
                if p["width"] < 200 or p["height"] < 100 or p["marks"] < 10:
                    failures.append("plot %s did not render (%.0f x %.0f px, %d marks)" %
                                    (p["id"], p["width"], p["height"], p["marks"]))
            for b in probe["broken_images"]:
                failures.append("broken image: %s" % b)
            for e in probe["errors"]:
                failures.append(e)
            for line in r.stderr.splitlines():
                if "Uncaught" in line or ("CONSOLE" in line and "ERROR" in line):
                    failures.append("chromium log: " + line.strip())
        if a.screenshot:
            width, height = (int(v) for v in a.size.split(","))
            shot = os.path.abspath(a.screenshot)
            if os.path.exists(shot):
                os.remove(shot)
            r = run_chromium(chromium, ["--window-size=%d,%d" % (width, height), "--screenshot=" + shot,
                                        "file://" + os.path.abspath(a.report)],
                             os.path.join(tmp, "profile-shot"), a.timeout)
            if not os.path.isfile(shot):
                failures.append("no screenshot written (exit %d): %s" % (r.returncode, r.stderr[-2000:]))
            else:
                w, h, channels, rows = png_pixels(shot)
                ink = sum(1 for row in rows for x in range(0, w * channels, channels)
                          if min(row[x], row[x + 1], row[x + 2]) < 200)
                share = ink / float(w * h)
                print("screenshot: %s, %d x %d px, %.1f%% non-white" % (a.screenshot, w, h, 100 * share))
                if (w, h) != (width, height):
                    failures.append("screenshot is %d x %d, expected %d x %d" % (w, h, width, height))
                if share < 0.01:
                    failures.append("screenshot is blank (%.2f%% non-white pixels)" % (100 * share))
    for f in failures:
        print("FAIL: " + f, file=sys.stderr)
    print("report renders: %s" % ("no" if failures else "yes"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
