"""Open an HTML file in headless Chromium through the DevTools protocol; collect errors; take a screenshot.

Used by tests/test_report.py. Chromium comes from Debian's `chromium` package; the protocol runs over
`--remote-debugging-pipe` (file descriptors 3 and 4, NUL-separated JSON), so no port is opened and
nothing beyond the standard library is needed. Errors collected: uncaught exceptions, console
messages of level error or warning, log entries of level error (failed resource loads, CSP
violations), and images that did not decode.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars",
    "--mute-audio", "--disable-dev-shm-usage", "--remote-debugging-pipe",
)


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    errors: list[str] = field(default_factory=list)
    broken_images: int = 0
    image_count: int = 0
    title: str = ""
    text: str = ""
    height: int = 0


class _Pipe:
    def __init__(self, executable: str, user_data_dir: str):
        to_r, self._to_w = os.pipe()
        self._from_r, from_w = os.pipe()

        def pipes_on_3_and_4() -> None:
            # Chromium reads commands from fd 3 and writes replies to fd 4. Copy the pipe ends out of
            # the way first, so that placing one cannot overwrite the other.
            a, b = os.dup(to_r), os.dup(from_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        # Every other descriptor Python opens is close-on-exec, so only 3 and 4 reach chromium.
        self.proc = subprocess.Popen(
            [executable, *CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}", "about:blank"],
            preexec_fn=pipes_on_3_and_4, close_fds=False,  # noqa: PLW1509 - single-threaded setup
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        os.close(to_r)
        os.close(from_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_r], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self._from_r, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the DevTools pipe: " + self.proc.stderr.read().decode(errors="replace")[-2000:])
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, name: str, timeout: float = 30) -> dict:
        for i, event in enumerate(self.events):
            if event.get("method") == name:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            event = self._read(deadline)
            if event.get("method") == name:
                return event
            self.events.append(event)

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_w)
        os.close(self._from_r)
        if self.proc.stderr:
            self.proc.stderr.close()


def open_page(target: Path | str, screenshot: Path | None = None, width: int = 1280, executable: str | None = None,
              settle_s: float = 0.3, cookies: list[dict[str, Any]] | None = None,
              steps: list[tuple[str, str]] | None = None, step_timeout_s: float = 60, height: int = 900) -> PageResult:
    """Load a file (Path) or URL (str) in headless Chromium; return the errors it raised; write a full-page
    PNG screenshot to `screenshot`.

    `cookies` are set before loading (DevTools `Network.setCookie` dicts: name, value, url or domain).
    `steps` drive a page that renders after it loads (a single-page app): each is (JavaScript to run,
    JavaScript expression to wait for until it is true), run in order after the load event. A step whose
    JavaScript returns ``{"click": [x, y]}`` gets a real mouse click there (widgets that ignore
    ``element.click()``). `height` is the viewport's (a dialog does not grow the page).
    """
    executable = executable or find_chromium()
    if executable is None:
        raise FileNotFoundError("no chromium executable on PATH")
    result = PageResult()
    with tempfile.TemporaryDirectory(prefix="synthval-chromium-") as profile:
        pipe = _Pipe(executable, profile)
        try:
            target_id = pipe.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = pipe.call("Target.attachToTarget", {"targetId": target_id, "flatten": True})["sessionId"]
            for domain in ("Runtime.enable", "Log.enable", "Page.enable"):
                pipe.call(domain, session=session)
            pipe.call("Emulation.setDeviceMetricsOverride",
                      {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
            url = target.resolve().as_uri() if isinstance(target, Path) else target
            if cookies:
                pipe.call("Network.enable", session=session)
                for cookie in cookies:
                    pipe.call("Network.setCookie", cookie, session=session)
            navigation = pipe.call("Page.navigate", {"url": url}, session=session)
            if navigation.get("errorText"):
                result.errors.append(f"navigation: {navigation['errorText']}")
            pipe.wait_event("Page.loadEventFired", timeout=60)

            def evaluate(expression: str) -> Any:
                reply = pipe.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session)
                if "exceptionDetails" in reply:
                    raise RuntimeError(f"evaluate {expression!r}: {reply['exceptionDetails']}")
                return reply["result"].get("value")

            for action, until in steps or []:
                done = evaluate(action) if action else None
                if isinstance(done, dict) and "click" in done:
                    x, y = done["click"]
                    for kind in ("mousePressed", "mouseReleased"):
                        pipe.call("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left",
                                                               "clickCount": 1}, session=session)
                deadline = time.monotonic() + step_timeout_s
                while not evaluate(f"Boolean({until})"):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{url}: still not {until!r} after {step_timeout_s} s; the page says: "
                                           f"{str(evaluate('document.body.innerText'))[:2000]}")
                    time.sleep(0.25)
            time.sleep(settle_s)  # late console messages

            result.image_count = evaluate("document.images.length")
            result.broken_images = evaluate(
                "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).length")
            result.title = evaluate("document.title")
            result.text = evaluate("document.body.innerText")
            result.height = int(evaluate("Math.ceil(document.documentElement.scrollHeight)"))
            if screenshot is not None:
                shot_height = min(max(result.height, height), 16000)
                pipe.call("Emulation.setDeviceMetricsOverride",
                          {"width": width, "height": shot_height, "deviceScaleFactor": 1, "mobile": False},
                          session=session)
                shot = pipe.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                 session=session, timeout=60)
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                screenshot.write_bytes(base64.b64decode(shot["data"]))
        finally:
            pipe.close()
    for event in pipe.events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            result.errors.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            result.errors.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            result.errors.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
    return result
