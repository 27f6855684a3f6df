"""Open a local HTML file in a real headless Chromium and report what a reader would see.

Chromium (the Debian package, installed by scripts/setup_env.sh) is driven over the DevTools
protocol on a pipe (`--remote-debugging-pipe`: JSON messages on fds 3/4, each ending in a NUL), so
no driver package or open port is needed. Console errors are every `console.error`/`assert`, every
uncaught exception and every browser log entry of level error (failed loads, CSP violations).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    def __init__(self, timeout: float = 60.0):
        exe = chromium_path()
        if exe is None:
            raise RuntimeError("chromium is not installed (run scripts/setup_env.sh or `make setup`)")
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="mmpr-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def use_pipes():  # the browser reads commands on fd 3 and answers on fd 4
            os.dup2(to_browser_r, 3)  # a no-op when the pipe already is fd 3: clear close-on-exec too
            os.dup2(from_browser_w, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.proc = subprocess.Popen(
            [
                exe,
                "--headless",
                "--remote-debugging-pipe",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-dev-shm-usage",
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=use_pipes,
            close_fds=False,
            start_new_session=True,
        )  # its own group: killable whole
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []

    # --- protocol ------------------------------------------------------------------------------

    def _read_message(self, deadline: float) -> dict:
        import select

        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            event = self._read_message(deadline)
            if event.get("method") == method:
                return event
            self.events.append(event)

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the browser and its renderer/zygote children
            self.proc.wait()
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- what the tests use --------------------------------------------------------------------

    def open(self, path: Path, width: int = 1280, height: int = 900) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        self.events.clear()
        self.send("Page.navigate", {"url": Path(path).resolve().as_uri()}, session)
        self.wait_for("Page.loadEventFired")
        return Page(self, session)


class Page:
    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session

    def evaluate(self, expression: str):
        result = self.browser.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
            self.session,
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"evaluating {expression[:60]!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def console_errors(self) -> list[str]:
        self.evaluate("0")  # flush: events that arrived before this answer are now in `events`
        errors = []
        for e in self.browser.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append(
                    " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
                )
            elif method == "Runtime.exceptionThrown":
                errors.append(str(p.get("exceptionDetails", {}).get("text")))
            elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
                errors.append(
                    f"{p['entry'].get('source')}: {p['entry'].get('text')} {p['entry'].get('url', '')}"
                )
        return errors

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params: dict = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        data = self.browser.send("Page.captureScreenshot", params, self.session)["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)


# What the preview tests read off the rendered page (computed by the browser, after layout).
PREVIEW_FACTS_JS = r"""
(async () => {
  const cards = [...document.querySelectorAll('article.pair-card')];
  const imgs = [...document.images];
  const decoded = await Promise.all(imgs.map(i => i.decode().then(() => true, () => false)));
  const sideText = (card, cls) => {
    const box = card.querySelector('.side.' + cls + ' .text'), mark = box.querySelector('.mark');
    const r = document.createRange(); r.setStart(box, 0); r.setEndBefore(mark);
    return {before: r.toString(), after: mark.nextElementSibling.textContent,
            verdict: card.querySelector('.side.' + cls + ' .verdict').innerText};
  };
  const layout = card => {
    const a = card.querySelector('.side.chosen').getBoundingClientRect();
    const b = card.querySelector('.side.rejected').getBoundingClientRect();
    return Math.abs(a.top - b.top) < 2 && a.right <= b.left && a.width >= 300 && b.width >= 300;
  };
  const fonts = [...document.querySelectorAll('.text, .q, .verdict, td')]
    .map(e => parseFloat(getComputedStyle(e).fontSize));
  return {
    pair_cards: cards.length,
    by_source: Object.fromEntries([...document.querySelectorAll('section.source')].map(
      s => [s.querySelector('h2').textContent, s.querySelectorAll('article.pair-card').length])),
    cards: cards.map(c => ({type: c.dataset.pairType, chosen: sideText(c, 'chosen'),
                            rejected: sideText(c, 'rejected'), side_by_side: layout(c)})),
    question_cards: [...document.querySelectorAll('article.question-card')].map(
      q => ({kind: q.dataset.kind, samples: q.querySelectorAll('table.samples tr').length - 1,
             text: q.innerText})),
    rejects: [...document.querySelectorAll('table.rejects tr')].slice(1).map(r => r.innerText),
    images: imgs.length,
    images_not_loaded: imgs.filter((i, k) => !i.complete || i.naturalWidth === 0 || !decoded[k]).length,
    thumbnails: document.querySelectorAll('img.thumb').length,
    scripts: document.scripts.length,
    textareas: document.querySelectorAll('textarea').length,
    scroll_width: document.documentElement.scrollWidth,
    viewport_width: window.innerWidth,
    min_font_px: Math.min(...fonts),
    text: document.body.innerText,
  };
})()
"""


def preview_facts(path: Path, screenshot: Path | None = None, width: int = 1280) -> dict:
    """Open `path` at `width` px in headless Chromium: the facts above, its console errors, and a
    screenshot of the first screen when asked."""
    with Browser() as browser:
        page = browser.open(path, width=width)
        facts = page.evaluate(PREVIEW_FACTS_JS)
        facts["console_errors"] = page.console_errors()
        if screenshot is not None:
            page.screenshot(screenshot)
    return facts
