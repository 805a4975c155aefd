"""Open a report in a real browser, headless: Debian's Chromium driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: JSON messages ended by a NUL byte on file descriptors 3 and 4), with the standard
library alone. What the tests check a generated report with, and how ``docs/images/report.png`` was taken:

    python -m fsseg.htmlreport.browser reports/x/index.html [--screenshot shot.png --width 1280 --height 900]

`open_page` loads a file from disk (``file://``), waits for its load event and returns what the page showed: the
console errors and exceptions (a picture that failed to load is one), every image with its natural width (0: broken),
the text of the elements asked for by id, and a PNG screenshot of the viewport.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
INSTALL_HINT = "install Debian's Chromium: apt-get update && apt-get install -y chromium"
FLAGS = (
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--mute-audio",
)


class BrowserError(RuntimeError):
    """Chromium is missing, did not start or did not answer."""


def find_chromium() -> str:
    """The Chromium executable (``$FSSEG_CHROMIUM``, else the first of `CHROMIUM_NAMES` on PATH)."""
    given = os.environ.get("FSSEG_CHROMIUM")
    if given and not shutil.which(given):
        raise BrowserError(f"$FSSEG_CHROMIUM is {given!r}, which is not an executable: {INSTALL_HINT}")
    path = given or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if not path:
        raise BrowserError(
            f"no Chromium found ({', '.join(CHROMIUM_NAMES)} on PATH, or $FSSEG_CHROMIUM): {INSTALL_HINT}"
        )
    return path


@dataclass
class PageResult:
    url: str
    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    images: list[dict] = field(default_factory=list)  # {"src", "complete", "naturalWidth"}
    texts: dict[str, str | None] = field(
        default_factory=dict
    )  # element id -> its text (None: no such element)
    title: str = ""
    screenshot: bytes = b""  # PNG


class _Pipe:
    """The DevTools protocol over Chromium's debugging pipe: commands with ids, events collected as they come."""

    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int, timeout: float) -> None:
        self.proc, self.write_fd, self.read_fd, self.timeout = proc, write_fd, read_fd, timeout
        self.buffer = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrowserError(f"Chromium did not answer within {self.timeout:.0f} s")
            ready, _, _ = select.select([self.read_fd], [], [], left)
            if ready:
                chunk = os.read(self.read_fd, 1 << 20)
                if not chunk:
                    raise BrowserError(f"Chromium closed its debugging pipe (exit status {self.proc.poll()})")
                self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not any(e.get("method") == method and e.get("sessionId") == session for e in self.events):
            self.events.append(self._read_message(deadline))


IMAGES_JS = "JSON.stringify(Array.from(document.images, i => ({src: i.src, complete: i.complete, naturalWidth: i.naturalWidth})))"


def open_page(
    path, ids: tuple[str, ...] = (), width: int = 1280, height: int = 900, timeout: float = 60.0
) -> PageResult:
    """Load ``path`` (an HTML file) in headless Chromium and report what it showed (see the module docstring)."""
    url = Path(path).resolve().as_uri()
    exe = find_chromium()
    profile = tempfile.mkdtemp(prefix="fsseg-chromium-")
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()

    def child_fds() -> None:  # Chromium reads commands on fd 3 and writes replies on fd 4
        os.dup2(to_chrome_r, 3)
        os.dup2(from_chrome_w, 4)

    args = [
        exe,
        *FLAGS,
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
        "--remote-debugging-pipe",
    ]
    if os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    proc = subprocess.Popen([*args, "about:blank"], pass_fds=(3, 4), preexec_fn=child_fds,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    pipe = _Pipe(proc, to_chrome_w, from_chrome_r, timeout)
    result = PageResult(url)
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session)  # fmt: skip
        pipe.events.clear()
        nav = pipe.send("Page.navigate", {"url": url}, session)
        if nav.get("errorText"):
            result.errors.append(f"navigation: {nav['errorText']}")
        pipe.wait_for("Page.loadEventFired", session)

        def evaluate(expr: str):
            return pipe.send("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)[
                "result"
            ].get("value")

        result.images = json.loads(evaluate(IMAGES_JS))
        result.title = evaluate("document.title")
        for i in ids:
            result.texts[i] = evaluate(
                f"(e => e ? e.textContent : null)(document.getElementById({json.dumps(i)}))"
            )
        shot = pipe.send("Page.captureScreenshot", {"format": "png"}, session)
        result.screenshot = base64.b64decode(shot["data"])
        for e in pipe.events:
            p = e.get("params", {})
            if e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                result.errors.append(
                    "console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"])
                )
            elif e.get("method") == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                result.errors.append(
                    f"exception: {d.get('exception', {}).get('description') or d.get('text')}"
                )
            elif e.get("method") == "Log.entryAdded" and p["entry"].get("level") == "error":
                result.errors.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        try:
            pipe.send("Browser.close")
        except BrowserError:
            pass
    finally:
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m fsseg.htmlreport.browser", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("page", type=Path, help="an HTML file (a report's index.html)")
    p.add_argument("--screenshot", type=Path, help="write the viewport as PNG here")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=900)
    args = p.parse_args(argv)
    res = open_page(args.page, width=args.width, height=args.height)
    broken = [i["src"] for i in res.images if not i["naturalWidth"]]
    print(
        f"{res.url}: {res.title!r}, {len(res.images)} images ({len(broken)} broken), {len(res.errors)} errors"
    )
    for line in res.errors + [f"broken image: {b}" for b in broken]:
        print(f"  {line}")
    if args.screenshot:
        from fsseg.files import atomic_write_bytes

        atomic_write_bytes(args.screenshot, res.screenshot)
        print(f"screenshot -> {args.screenshot}")
    return 1 if res.errors or broken else 0


if __name__ == "__main__":
    sys.exit(main())
