"""The live report in a real browser: Debian's headless Chromium opens ``report.html`` of a
federated run (a round in progress), and the page renders (title, headings, the run's
status), every embedded plot and grid decodes (``naturalWidth > 0``), nothing is logged to
the console as an error, and the page reloads itself; the finished run's page does not.

Chromium is driven over its DevTools protocol through ``--remote-debugging-pipe`` (NUL-
terminated JSON on file descriptors 3 and 4): the standard library only, no websocket
client, no browser download. Skipped, saying why, where ``chromium`` is not installed
(``scripts/setup.sh`` installs Debian's). ``DPFL_SAVE_SCREENSHOT=1`` also copies the
screenshot to ``docs/images/live-report.png``.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dpfl.shared.federation.ledger import PrivacyLedger
from dpfl.shared.report.build import write_report

from .test_report import EPS, federated_run

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--window-size=1200,1600"]

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install "
    "chromium; scripts/setup.sh does it as root): the report is not checked in a browser")

#: what the page reports about itself once loaded
PROBE = """JSON.stringify({
  title: document.title,
  h1: [...document.querySelectorAll('h1')].map(e => e.textContent),
  h2: [...document.querySelectorAll('h2')].map(e => e.textContent),
  refresh: [...document.querySelectorAll('meta[http-equiv="refresh"]')].map(e => e.content),
  images: [...document.images].map(i => ({alt: i.alt, complete: i.complete,
                                          width: i.naturalWidth, height: i.naturalHeight})),
  text: document.body.innerText})"""


class Chromium:
    """One headless Chromium, driven over the DevTools protocol on a pipe."""

    def __init__(self, profile: Path):
        to_browser, self._cmd = os.pipe()
        self._out, from_browser = os.pipe()
        self.log = profile.with_suffix(".log")  # the browser's own stderr (never a full pipe)
        # the browser reads commands on fd 3 and writes replies and events on fd 4
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser} '
                 f"{to_browser}<&- {from_browser}>&-", CHROMIUM, *FLAGS,
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL, stderr=err)
        os.close(to_browser)
        os.close(from_browser)
        self._id, self._buf, self.events = 0, b"", []

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._out, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited: {self.log.read_text()[-2000:]}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, session: str | None = None, timeout: float = 60, **params):
        self._id += 1
        cmd = {"id": self._id, "method": method, "params": params}
        os.write(self._cmd, json.dumps({**cmd, **({"sessionId": session} if session else {})}
                                       ).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            msg = self._read(deadline)
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for i, msg in enumerate(self.events):
            if msg.get("method") == method:
                return self.events.pop(i)
        while True:
            msg = self._read(deadline)
            if msg.get("method") == method:
                return msg
            self.events.append(msg)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd)
        os.close(self._out)


def console_errors(events: list[dict]) -> list[str]:
    """Every error the page logged: console.error/assert, uncaught exceptions, and the
    browser's own log entries (a resource that failed to load, a blocked request)."""
    out = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error",
                                                                                "assert"):
            out.append(" ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif e.get("method") == "Runtime.exceptionThrown":
            out.append(p["exceptionDetails"].get("text", "exception"))
        elif e.get("method") == "Log.entryAdded" and p["entry"]["level"] == "error":
            out.append(p["entry"]["text"])
    return out


def open_page(html: Path, profile: Path, screenshot: Path | None = None) -> tuple[dict, list]:
    """Load ``html`` in headless Chromium; the page's probe, its console errors and,
    optionally, a PNG screenshot of the top of the page (1200 x 1600 CSS pixels)."""
    browser = Chromium(profile)
    try:
        target = browser.send("Target.createTarget", url="about:blank")["targetId"]
        session = browser.send("Target.attachToTarget", targetId=target,
                               flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session)
        browser.send("Page.navigate", session, url=html.resolve().as_uri())
        browser.wait_for("Page.loadEventFired")
        probe = browser.send("Runtime.evaluate", session, expression=PROBE,
                             returnByValue=True)["result"]["value"]
        if screenshot is not None:
            shot = browser.send("Page.captureScreenshot", session, format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        return json.loads(probe), console_errors(browser.events)
    finally:
        browser.close()


def test_live_report_renders_in_chromium_with_every_image_and_no_errors(tmp_path):
    run, site_dirs = federated_run(tmp_path, {r: EPS[r] for r in (1, 2)}, finished=False)
    led = PrivacyLedger.load_or_create(run / "ledger.json")
    for entry in led.rounds:  # site-2 trained 30 steps in an earlier run: its start is unknown
        entry["sites"].get("site-2", {})["steps"] = 40
    led.begin_round(3, sorted(EPS[3]))
    html = write_report(run, site_dirs, live=True)  # as the coordinator renders it
    shot = tmp_path / "live-report.png"
    page, errors = open_page(html, tmp_path / "profile", shot)
    assert errors == []
    assert page["title"] == "dpfl federated DP-LoRA run: fed (live: 2 of 3 rounds recorded)"
    assert page["h1"] == [page["title"]]
    for heading in ("Run status", "Privacy guarantee",
                    "Privacy spend per site: this run and lifetime", "Privacy spend over rounds",
                    "Training loss", "Sample grids per round", "Configuration"):
        assert heading in page["h2"], (heading, page["h2"])
    assert page["refresh"] == ["15"] and "In progress: 2 of 3 round(s) recorded, global ε " \
        "4.000 (δ 1.0e-05); round 3 was sent to site-0, site-1, site-2" in page["text"]
    assert "Sites may have spent more ε than their last report" in page["text"]
    assert "site-2\t≤ 4\t4\t4\t10\t2\tnot known" in page["text"]
    # three plots (ε, updates, site loss) and three grids, each decoded by the browser
    assert len(page["images"]) == 6
    bad = [i["alt"] for i in page["images"] if not (i["complete"] and i["width"] > 0)]
    assert bad == [], f"images that did not load: {bad}"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("DPFL_SAVE_SCREENSHOT") == "1":
        (ROOT / "docs" / "images").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, ROOT / "docs" / "images" / "live-report.png")


def test_finished_report_does_not_reload(tmp_path):
    run, _ = federated_run(tmp_path)
    page, errors = open_page(write_report(run, live=True), tmp_path / "profile")
    assert errors == [] and page["refresh"] == []
    assert "Finished: 3 of 3 round(s) recorded" in page["text"]
    assert all(i["width"] > 0 for i in page["images"]) and len(page["images"]) == 6  # 2 + 4
