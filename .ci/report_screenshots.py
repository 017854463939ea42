#!/usr/bin/env python3
"""Render a Snakemake HTML report in headless Chromium and save screenshots of its views.

Snakemake's report is a single-page app without URLs for its views, so every screenshot is taken from
a copy of the report with one line of JavaScript appended that opens a view through the app's own
``app.setView`` (the landing page, then each result whose path matches ``--results``, caption shown
in the side bar). Needs Debian's ``chromium`` package (``apt-get install chromium``).

    python .ci/report_screenshots.py results/smoke/report.html --out results/smoke/report-screenshots
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

OPEN_VIEW = """<script>
window.addEventListener("load", function () {{ setTimeout(function () {{
  var path = {path};
  if (path === null) return;
  var entry = results[path];
  app.setView({{navbarMode: "resultinfo", resultPath: path, contentPath: entry.data_uri,
               content: entry.mime_type === "text/html" ? "html" : "img"}});
}}, 200); }});
</script>
</body>"""

DEFAULT_RESULTS = ["*/tables/paper-*.html", "*/tables/metrics.html", "*/tables/ablation-candidates.html",
                   "*/plots/tradeoff-*.png", "*/plots/samples/*.png", "*/plots/calibration-*.png",
                   "*/tables/benchmarks.html"]


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    sys.exit("no chromium found: apt-get install chromium (Debian) and run again")


def result_paths(report: str, patterns: list[str]) -> list[str]:
    """Result paths embedded in the report, in the order of ``patterns``."""
    match = re.search(r"var results = (\{.*?\});\n", report, re.S)
    if not match:
        sys.exit("not a Snakemake HTML report: no 'var results = {...};' found")
    paths = list(json.loads(match.group(1)))
    chosen = [p for pattern in patterns for p in sorted(fnmatch.filter(paths, pattern))]
    return list(dict.fromkeys(chosen))


def screenshot(browser: str, html: Path, png: Path, size: str) -> None:
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={size}", "--virtual-time-budget=15000", f"--screenshot={png}",
                    html.resolve().as_uri()], check=True, capture_output=True, timeout=180)
    if not png.is_file() or png.stat().st_size < 10_000:
        sys.exit(f"{png}: no screenshot (or an empty page) from {html}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="report.html written by `snakemake --report`")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG screenshots")
    parser.add_argument("--results", nargs="*", default=DEFAULT_RESULTS, help="result path patterns to open")
    parser.add_argument("--size", default="2000,1000", help="browser window width,height")
    args = parser.parse_args()
    browser = chromium()
    report = args.report.read_text()
    if "</body>" not in report:
        sys.exit(f"{args.report}: no </body> tag; not an HTML report")
    args.out.mkdir(parents=True, exist_ok=True)
    views = [("00-home", None)] + [(f"{i:02d}-{Path(p).stem}", p)
                                   for i, p in enumerate(result_paths(report, args.results), start=1)]
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in views:
            page = Path(tmp) / f"{name}.html"
            head, _, tail = report.rpartition("</body>")
            page.write_text(head + OPEN_VIEW.format(path=json.dumps(path)) + tail)
            png = args.out / f"{name}.png"
            screenshot(browser, page, png, args.size)
            print(f"{png}  <- {path or 'landing page'}")


if __name__ == "__main__":
    main()
