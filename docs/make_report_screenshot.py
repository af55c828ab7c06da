"""Regenerate the evaluation report of the docs and check it in a real headless browser.

    python docs/make_report_screenshot.py               # pyattr evaluate (defaults) -> docs/report/, screenshot
    python docs/make_report_screenshot.py --n 8 --methods gradcam,saliency   # a quick one

Runs ``pyattr evaluate`` into ``docs/report/`` (report.html, results.json, results.md, images/), then opens the
page in headless Chromium (the Debian package ``chromium``): the DOM it renders must hold one table row per
method, every picture must have loaded from the folder, and the sort must work (the page opened as
``report.html#sort=K`` is sorted by column K in the browser); then it saves ``docs/evaluate_report.png``.
Exits 1 with a message when a check fails, 2 when no Chromium is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DOCS = Path(__file__).resolve().parent


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def browser(binary: str, *args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                               *args], capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        sys.exit(f"chromium failed ({done.returncode}): {done.stderr[-500:]}")
    return done.stdout


def first_column(dom: str) -> list[str]:
    """The method names in the order the browser shows the metrics table's rows."""
    body = dom[dom.index('id="metrics"'):]
    body = body[:body.index("</table>")]
    rows = re.findall(r"<tr>(.*?)</tr>", body, flags=re.DOTALL)
    return [re.search(r"<td[^>]*>(.*?)</td>", row).group(1) for row in rows if "<td" in row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=DOCS / "report")
    parser.add_argument("--screenshot", type=Path, default=DOCS / "evaluate_report.png")
    parser.add_argument("--no-run", action="store_true", help="check the report already in --out")
    args, rest = parser.parse_known_args()
    binary = chromium()
    if binary is None:
        print("no Chromium here: apt-get install chromium (Debian), then run again", file=sys.stderr)
        sys.exit(2)
    if not args.no_run:
        from pyattr.cli import main as pyattr_main

        code = pyattr_main(["evaluate", "--out", str(args.out), "--grid", "4", *rest])
        if code:
            sys.exit(code)
    results = json.loads((args.out / "results.json").read_text())
    url = (args.out / "report.html").resolve().as_uri()
    dom = browser(binary, "--dump-dom", url)
    shown = first_column(dom)
    if shown != results["methods"]:
        sys.exit(f"the browser shows rows {shown}, expected {results['methods']}")
    pictures = set(re.findall(r'<img src="([^"]+)"', dom))
    for src in pictures:
        if not (args.out / src).is_file():
            sys.exit(f"the page references {src}, which is not in {args.out}")
    # sort by the first metric column: the browser's order must be the values' order (missing values last)
    key = results["metrics"][0]["key"]
    values = {m: results["table"][m][key] for m in results["methods"]}
    expected = sorted(results["methods"], key=lambda m: (values[m] is None, values[m] or 0.0))
    sorted_rows = first_column(browser(binary, "--dump-dom", url + "#sort=1"))
    if [values[m] for m in sorted_rows] != [values[m] for m in expected]:
        sys.exit(f"sorting by {key} in the browser gave {sorted_rows}")
    browser(binary, f"--screenshot={args.screenshot.resolve()}", "--window-size=1280,1600", url)
    print(f"checked {url} in {Path(binary).name}: {len(shown)} rows, {len(pictures)} "
          f"pictures found, sort by {key} works; screenshot {args.screenshot}")


if __name__ == "__main__":
    main()
