"""The rendered book in a real browser: headless Chromium (Debian's chromium + chromium-driver) through Selenium.

Serves _build/html on 127.0.0.1, crawls every HTML page reachable from index.html and, for each page, checks that it
loads (HTTP 200, document complete), that every <img> is decoded and displayed, that the browser logs no console
error, that the page requests nothing from another origin (the book must work offline), and that every internal link
resolves to a served file and, with a #fragment, to an element with that id on the target page. All failures are
reported together. Without /usr/bin/chromium and /usr/bin/chromedriver (or on PATH) the test is skipped with
that reason, except under CI=true, where it fails.

The file name sorts after test_runner.py on purpose: pytest runs test files in name order, and this test reads the
book that test_runner's slow suite-and-book test builds (`make test` runs both; `make book` builds it alone).
"""

from __future__ import annotations

import http.server
import shutil
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from synthgap_helpers import runner

REPO = Path(__file__).resolve().parents[1]
HTML = REPO / "_build" / "html"
PAGE_TIMEOUT_S = 30.0

pytestmark = pytest.mark.slow

# Flags for Chromium on a machine without network: no sandbox (root in CI), no background connections, and every
# host name resolves to nothing, so a request to another origin fails here exactly as it would offline.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,900",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]

# Waits for the page to settle, then returns what the test checks. Images: decode() rejects for a broken image;
# an SVG without intrinsic size may report naturalWidth 0 yet be fine, so it only has to decode.
PAGE_REPORT_JS = """
const done = arguments[arguments.length - 1];
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    try { await MathJax.startup.promise; } catch (e) {}
  }
  const images = [];
  for (const img of Array.from(document.images)) {
    img.loading = 'eager';
    let decoded = true;
    try { await img.decode(); } catch (e) { decoded = false; }
    const src = img.currentSrc || img.getAttribute('src') || '';
    const svg = /\\.svg([?#]|$)/i.test(src) || src.startsWith('data:image/svg');
    const rendered = img.getClientRects().length > 0;
    const box = img.getBoundingClientRect();
    images.push({src: src || img.outerHTML.slice(0, 160), decoded, complete: img.complete, svg, rendered,
                 natural: img.naturalWidth, width: box.width, height: box.height});
  }
  const links = Array.from(document.querySelectorAll('a[href]')).map(a => a.href);
  const refresh = document.querySelector('meta[http-equiv="refresh" i]');
  if (refresh) {
    const m = /url\\s*=\\s*(.+)$/i.exec(refresh.getAttribute('content') || '');
    if (m) links.push(new URL(m[1].trim().replace(/^['"]|['"]$/g, ''), document.baseURI).href);
  }
  const ids = Array.from(document.querySelectorAll('[id]')).map(e => e.id)
    .concat(Array.from(document.querySelectorAll('a[name]')).map(a => a.name));
  const resources = performance.getEntriesByType('resource').map(e => e.name);
  const icon = !!document.querySelector('link[rel~="icon" i]');
  done({ready: document.readyState, url: location.href, images, links, ids, resources, icon});
})().catch(e => done({error: String(e && e.stack || e)}));
"""


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the book quietly and records (path, status) of every request, for the page statuses and 404s."""

    requests: list[tuple[str, int]]

    def log_request(self, code="-", size="-"):
        self.requests.append((urllib.parse.urlsplit(self.path).path, int(getattr(code, "value", code))))

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


@pytest.fixture(scope="module")
def book_server() -> Iterator[tuple[str, list[tuple[str, int]]]]:
    if not (HTML / "index.html").exists():
        pytest.fail(f"{HTML / 'index.html'} is missing: build the book first (`make book`); `make test` builds it "
                    "in tests/test_runner.py before this test runs")
    requests: list[tuple[str, int]] = []
    handler = type("Handler", (_Handler,), {"requests": requests})

    def make_handler(*args, **kwargs):
        return handler(*args, directory=str(HTML), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, needs_or_skip):
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    chromedriver = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    missing = [p for p in (chromium, chromedriver) if not Path(p).exists()]
    if missing:  # skipped with this reason, a failure under CI=true (conftest's needs_or_skip)
        needs_or_skip(f"the browser check needs Debian's chromium and chromium-driver ({', '.join(missing)} missing):"
                      " apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager (which would try to download a driver) is never consulted.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(PAGE_TIMEOUT_S)
    driver.set_script_timeout(PAGE_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _split(url: str) -> tuple[str, str]:
    """(url without query and fragment, decoded fragment)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")), urllib.parse.unquote(parts.fragment)


def _is_page(url: str) -> bool:
    path = urllib.parse.urlsplit(url).path
    return path.endswith((".html", "/"))


def _load(driver, url: str) -> dict:
    """Opens url, follows a meta refresh, waits until no new resource has loaded for a while, then reports."""
    from selenium.common.exceptions import JavascriptException, WebDriverException

    driver.get(url)
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    last, stable = -1, 0
    while time.monotonic() < deadline:
        try:
            state = driver.execute_script(
                "return [document.readyState, performance.getEntriesByType('resource').length, location.href,"
                " !!document.querySelector('meta[http-equiv=\"refresh\" i]')]")
        except (JavascriptException, WebDriverException):  # the page is being replaced (meta refresh)
            time.sleep(0.2)
            continue
        ready, count, href, refresh = state
        if refresh and _split(href)[0] == _split(url)[0]:
            time.sleep(0.2)  # index.html redirects: wait for the target page
            continue
        stable = stable + 1 if (ready == "complete" and count == last) else 0
        last = count
        if stable >= 3:
            break
        time.sleep(0.25)
    return driver.execute_async_script(PAGE_REPORT_JS)


# browser first: without Chromium the test is skipped (or fails under CI=true) before it asks for the book.
def test_every_page_loads_with_its_images_no_console_error_and_resolving_links(browser, book_server):
    base, requests = book_server
    origin = urllib.parse.urlsplit(base).netloc
    failures: list[str] = []
    pages: dict[str, dict] = {}  # url without fragment -> report
    links: list[tuple[str, str]] = []  # (page, link)
    queue = [base + "index.html"]
    while queue:
        url = queue.pop(0)
        if url in pages:
            continue
        already = len(requests)
        report = _load(browser, url)
        pages[url] = report
        name = url.removeprefix(base)
        if "error" in report:
            failures.append(f"{name}: the page report failed: {report['error']}")
            continue
        landed = _split(report["url"])[0]
        if landed != url:  # a redirect: the page it lands on is a page of its own, checked here
            pages.setdefault(landed, report)
            name = f"{name} -> {landed.removeprefix(base)}"
        # A page without <link rel="icon"> makes Chromium itself ask for /favicon.ico; the page asks for nothing
        # missing, so that one request (and its console line) is not the book's. A declared icon must load.
        implicit_icon = "/favicon.ico" if not report["icon"] else None
        served = dict((path, status) for path, status in requests[already:])
        report["status"] = served.get(urllib.parse.urlsplit(landed).path, "no response")
        for path, status in requests[already:]:
            if status >= 400 and path != implicit_icon:
                failures.append(f"{name}: HTTP {status} for {path}")
        if report["ready"] != "complete":
            failures.append(f"{name}: document.readyState is {report['ready']!r}")
        for img in report["images"]:
            shown = img["decoded"] and img["complete"] and (img["natural"] > 0 or img["svg"])
            if img["rendered"]:
                shown = shown and img["width"] > 0 and img["height"] > 0
            if not shown:
                failures.append(f"{name}: image not displayed: {img['src']} ({img})")
        for resource in report["resources"]:
            parts = urllib.parse.urlsplit(resource)
            if parts.scheme in ("http", "https") and parts.netloc != origin:
                failures.append(f"{name}: requests an external resource (the book must work offline): {resource}")
        for entry in browser.get_log("browser"):
            if entry.get("level") == "SEVERE" and not (
                    implicit_icon and entry.get("message", "").startswith(base + implicit_icon.lstrip("/") + " ")):
                failures.append(f"{name}: console error: {entry.get('message')}")
        for link in report["links"]:
            parts = urllib.parse.urlsplit(link)
            if parts.scheme not in ("http", "https") or parts.netloc != origin:
                continue
            links.append((name, link))
            target = _split(link)[0]
            if _is_page(target) and target not in pages and target not in queue:
                queue.append(target)

    for name, link in links:
        target, fragment = _split(link)
        shown = link.removeprefix(base)
        if _is_page(target):
            report = pages.get(target)
            if report is None or "error" in report:
                failures.append(f"{name}: link to {shown}: the page did not load")
            elif report["status"] not in (200, 304):
                failures.append(f"{name}: link to {shown}: HTTP {report['status']}")
            elif fragment and fragment not in report["ids"]:
                failures.append(f"{name}: link to {shown}: no element with id {fragment!r} on that page")
        else:
            path = urllib.parse.urlsplit(target).path
            file = HTML / urllib.parse.unquote(path).lstrip("/")
            if not file.is_file():
                failures.append(f"{name}: link to {shown}: no such file in _build/html")

    visited = {urllib.parse.urlsplit(u).path.lstrip("/") for u in pages}
    for toc_file in runner.toc_files(REPO):
        if f"{toc_file}.html" not in visited:
            failures.append(f"{toc_file}.html (in _toc.yml) is not reachable from index.html")
    seen = sorted(dict.fromkeys(failures))
    assert not seen, f"{len(seen)} problem(s) in the rendered book ({len(pages)} pages):\n" + "\n".join(seen)
