"""How a model's answer is shown: Markdown per task, and the sandboxed HTML preview.

Security rule: generated HTML never runs on the app's origin. The chat shows HTML only as a fenced
code block (Chainlit's `unsafe_allow_html` stays false); the rendered page lives in an
`<iframe sandbox srcdoc=...>` drawn by `public/elements/HtmlPreview.jsx`, with three walls:

1. the iframe's `sandbox` attribute (`SANDBOX`): never `allow-same-origin`, so the page gets an opaque
   origin and cannot read the app's cookies, storage or DOM; no forms, popups or top navigation;
2. a Content-Security-Policy `<meta>` that `preview_document` puts first, so it governs everything the
   model wrote: no network at all (images and fonts only as `data:` URLs), no scripts by default;
3. defence in depth: `<meta http-equiv="refresh">`, `<base>` and DNS-prefetch/preconnect links are
   removed from the model's HTML (CSP does not cover those).

Scripts in previews are off by default: a generated landing page still shows its layout and styles
without them, and a script, even one that cannot reach the network, could navigate its frame to any
address (CSP cannot forbid navigation) and so leak what the page holds. `BABL_PREVIEW_SCRIPTS=1`
turns them on (the sandbox then gets `allow-scripts`, still without `allow-same-origin`, and the CSP
allows inline scripts only).

The download of a generated page is offered with a non-HTML type (`DOWNLOAD_MIME`): a file served or
created on the app's origin as `text/html` would run there when opened.

Nothing here imports Chainlit; `app.py` passes `preview_props(...)` to a `cl.CustomElement`.
"""

from __future__ import annotations

import html as html_lib
import re
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass

from babl_core.settings import TASKS, env_flag

# --- fences -----------------------------------------------------------------------------------

_HTML_INFO = frozenset({"html", "htm", "html5", "xhtml"})
_LINE = re.compile(r"[^\n]*\n|[^\n]+$")
_FENCE_OPEN = re.compile(r"^ {0,3}(?P<marker>`{3,}|~{3,})(?P<info>[^\n]*)$")


@dataclass(frozen=True)
class _Fence:
    """One fenced code block, as offsets into the text it was found in."""

    start: int  # the opening fence line
    body_start: int  # just after the opening line
    body_end: int  # the closing fence line (len(text) when unclosed)
    end: int  # just after the closing line (len(text) when unclosed)
    marker: str  # "```", "~~~~", ...
    info: str  # first word of the info string, lower case ("" when none)
    closed: bool


def _normalize(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _scan_fences(text: str) -> list[_Fence]:
    """The fenced code blocks of `text`, following CommonMark's rules for fences (an opening line of
    3+ backticks or tildes indented at most 3 spaces; a closing line of the same character, at least
    as long, and nothing else)."""
    fences: list[_Fence] = []
    open_fence: dict | None = None
    for match in _LINE.finditer(text):
        line = match.group().rstrip("\n")
        if open_fence is None:
            opening = _FENCE_OPEN.match(line)
            if opening is None:
                continue
            marker, info = opening.group("marker"), opening.group("info").strip()
            if marker[0] == "`" and "`" in info:
                continue  # a backtick fence's info string cannot hold backticks: inline code
            open_fence = {
                "start": match.start(),
                "body_start": match.end(),
                "marker": marker,
                "info": info.split()[0].lower() if info else "",
            }
        else:
            stripped = line.strip(" ")
            marker = open_fence["marker"]
            indent = len(line) - len(line.lstrip(" "))
            if indent <= 3 and len(stripped) >= len(marker) and stripped == marker[0] * len(stripped):
                fences.append(_Fence(body_end=match.start(), end=match.end(), closed=True, **open_fence))
                open_fence = None
    if open_fence is not None:
        fences.append(_Fence(body_end=len(text), end=len(text), closed=False, **open_fence))
    return fences


def _fence_around(body: str, info: str) -> str:
    """`body` in a backtick fence longer than any backtick run inside it."""
    body = body.strip("\n")
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    marker = "`" * max(3, longest + 1)
    return f"{marker}{info}\n{body}\n{marker}"


def _close_open_fence(text: str) -> str:
    fences = _scan_fences(text)
    if not fences or fences[-1].closed:
        return text
    return text + ("" if text.endswith("\n") else "\n") + fences[-1].marker


# --- extracting the HTML ----------------------------------------------------------------------

_DOCTYPE = re.compile(r"<!doctype\s+html", re.IGNORECASE)
_HTML_START = re.compile(r"<html(?=[\s>/])", re.IGNORECASE)
_HTML_END = re.compile(r"</html\s*>", re.IGNORECASE)
_MARKUP = re.compile(r"<(?:[a-zA-Z][a-zA-Z0-9-]*|!--)[\s>/]")


def _raw_document_span(text: str, fences: list[_Fence]) -> tuple[int, int] | None:
    """Where a raw HTML document (`<!DOCTYPE html` or `<html`) starts and ends in `text`: up to its
    `</html>`, else to the end of the fence it sits in, else to the end of the text."""
    match = _DOCTYPE.search(text) or _HTML_START.search(text)
    if match is None:
        return None
    start = match.start()
    end_tag = _HTML_END.search(text, start)
    if end_tag is not None:
        return start, end_tag.end()
    for fence in fences:
        if fence.body_start <= start < fence.body_end:
            return start, fence.body_end
    return start, len(text)


def extract_html(text: str, *, partial: bool = False) -> str | None:
    """The HTML document in a model's answer.

    Looks first for a fenced ```html block (the first one; with `partial`, a block still open
    because the answer is streaming counts too), else for a raw document starting with
    `<!DOCTYPE html` or `<html` (any case), which runs to its `</html>` or the end of the text.

    Args:
        text: The answer so far.
        partial: True while the answer is still streaming. Pass True as well for an answer that was
            stopped or cut off by `max_new_tokens`, so its unfinished block is still previewed.

    Returns:
        The HTML (stripped of surrounding blank space), or None when the answer holds none.
    """
    text = _normalize(text)
    fences = _scan_fences(text)
    for fence in fences:
        if fence.info in _HTML_INFO and (fence.closed or partial):
            body = text[fence.body_start : fence.body_end].strip()
            if body:
                return body
    span = _raw_document_span(text, fences)
    if span is None:
        return None
    return text[span[0] : span[1]].strip() or None


# --- Markdown for the chat --------------------------------------------------------------------

# Text made only of Markdown syntax characters, which renders as no readable text at all.
_ONLY_MARKDOWN_SYNTAX = re.compile(r"[\s>#*_\-=+~|`]+")
# A last line of one or two backticks/tildes: a fence still being typed.
_INCOMPLETE_FENCE = re.compile(r"(?:\A|\n) {0,3}(?:`{1,2}|~{1,2})\Z")


def format_answer(task: str, text: str, *, partial: bool = False) -> str:
    """The Markdown the chat shows for a model's answer.

    - html: the HTML in a fenced ```html block; an answer the model fenced itself is kept as it is,
      prose around the HTML is kept.
    - python, code: a fenced ```python block, unless the model already fenced its code.
    - email: the text as written, paragraphs kept and line breaks shown (Markdown would otherwise
      join the lines of a paragraph).
    - qa, chat: as written.
    - any task: an answer made only of Markdown syntax (`>`, `#`, `---` ...) in a ```text block, so
      the bubble shows what the model wrote instead of nothing.

    Safe while streaming: a fence left open by a partial answer is closed, so it cannot swallow
    what follows, and a trailing one- or two-character fence still being typed is held back.

    Args:
        task: One of `babl_core.settings.TASKS`.
        text: The answer so far.
        partial: True while the answer is still streaming.

    Raises:
        ValueError: For a task that is not in TASKS.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASKS)}; set the catalog entry's `task`")
    text = _normalize(text)
    if partial:
        text = _INCOMPLETE_FENCE.sub("", text)
    if not text.strip():
        return ""
    if _ONLY_MARKDOWN_SYNTAX.fullmatch(text):
        # Rendered as Markdown this shows nothing (a line of `>` is an empty quote, `#` an empty
        # heading, `---` a rule): show the characters the model wrote instead of an empty bubble.
        return _fence_around(text, "text")
    if task == "html":
        shown = _format_html(text, partial=partial)
    elif task in ("python", "code"):
        shown = text if _already_fenced(text) else _fence_around(text, "python")
    elif task == "email":
        shown = _format_email(text)
    else:
        shown = text
    return _close_open_fence(images_as_links(shown))


# Markdown image syntax: `![alt](url)`, `![alt][ref]`, `![ref]` (a backslash-escaped `!` is text).
_IMAGE_START = re.compile(r"(?<!\\)!\[")
# An inline code span: a run of backticks up to the next run of the same length (CommonMark).
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`).*?(?<!`)\1(?!`)", re.DOTALL)


def images_as_links(markdown: str) -> str:
    """`markdown` with every image turned into a plain link (`![alt](url)` -> `[alt](url)`), outside
    code blocks and code spans, which show their text as is.

    The chat renders answers as Markdown on the app's page: an image there is fetched as soon as it
    is shown (at every streaming update), so a model, or a prompt injection in a pasted document,
    could send the conversation to any server in an image URL. A link is only followed when the user
    clicks it. The app page's Content-Security-Policy (`babl_core.web.page_policy`) blocks other origins
    too; this keeps the answer readable instead of showing broken images.
    """
    if "![" not in markdown:
        return markdown
    out: list[str] = []
    pos = 0
    for fence in _scan_fences(markdown):
        out.append(_prose_images_as_links(markdown[pos : fence.start]))
        out.append(markdown[fence.start : fence.end])
        pos = fence.end
    out.append(_prose_images_as_links(markdown[pos:]))
    return "".join(out)


def _prose_images_as_links(text: str) -> str:
    out: list[str] = []
    pos = 0
    for span in _CODE_SPAN.finditer(text):
        out.append(_IMAGE_START.sub("[", text[pos : span.start()]))
        out.append(span.group())
        pos = span.end()
    out.append(_IMAGE_START.sub("[", text[pos:]))
    return "".join(out)


def _already_fenced(text: str) -> bool:
    """The model fenced its code: a closed fence, or an open one naming a language (a lone ``` line
    left open is more likely part of the code, e.g. inside a string)."""
    return any(fence.closed or fence.info for fence in _scan_fences(text))


def _format_html(text: str, *, partial: bool) -> str:
    fences = _scan_fences(text)
    if any(fence.info in _HTML_INFO for fence in fences):
        return text  # the model fenced its HTML: keep its layout
    span = _raw_document_span(text, fences)
    if span is not None:
        start, end = span
        if any(fence.body_start <= start < fence.body_end for fence in fences):
            return text  # fenced under another (or no) language: already a code block
        before, document, after = text[:start].strip(), text[start:end], text[end:].strip()
        parts = [before, _fence_around(document, "html"), after]
        return "\n\n".join(part for part in parts if part)
    if not fences and _MARKUP.search(text):
        return _fence_around(text, "html")  # a fragment (`<div>...`): still code, not prose
    return text


def _format_email(text: str) -> str:
    paragraphs = re.split(r"\n[ \t]*\n+", text.strip("\n"))
    # Two trailing spaces are a Markdown hard break: keep the email's own line breaks.
    return "\n\n".join("  \n".join(line.rstrip() for line in p.split("\n")) for p in paragraphs)


# --- the sandboxed preview --------------------------------------------------------------------

# The only sandbox token a preview may ever get. Never add allow-same-origin (with it, the page would
# share the app's origin: cookies, storage, the chat's DOM), nor allow-top-navigation, allow-popups
# or allow-forms (ways out of the frame).
ALLOWED_SANDBOX_TOKENS = frozenset({"allow-scripts"})
FORBIDDEN_SANDBOX_TOKENS = frozenset(
    {
        "allow-same-origin",
        "allow-top-navigation",
        "allow-top-navigation-by-user-activation",
        "allow-top-navigation-to-custom-protocols",
        "allow-popups",
        "allow-popups-to-escape-sandbox",
        "allow-forms",
    }
)

SANDBOX = ""
"""The iframe's sandbox attribute for a preview: empty, i.e. every restriction on (no scripts, no
forms, no popups, no navigation of the app, opaque origin)."""

SANDBOX_WITH_SCRIPTS = "allow-scripts"
"""The sandbox attribute when `BABL_PREVIEW_SCRIPTS=1`: scripts run, in an opaque origin."""

PREVIEW_SCRIPTS_ENV = "BABL_PREVIEW_SCRIPTS"

MAX_PREVIEW_BYTES = 512 * 1024
"""Larger documents are cut for the preview (the props travel over the socket at each update); the
download keeps the whole document."""

DOWNLOAD_MIME = "application/octet-stream"
"""The type a generated page is offered for download with. Not text/html: Chainlit serves a
`cl.File` from the app's origin with the element's mime (and guesses text/html from a .html name
when none is given), and a Blob URL lives on the app's origin too; as text/html the page would run
there when opened. application/octet-stream is always saved, never rendered (text/plain would
be displayed inline, and some browsers have sniffed HTML in it)."""


def check_sandbox(value: str) -> str:
    """Returns `value` if it is a sandbox attribute a preview may use, else raises.

    Raises:
        ValueError: When `value` holds a token other than those in ALLOWED_SANDBOX_TOKENS, above all
            allow-same-origin.
    """
    tokens = value.lower().split()
    forbidden = sorted(set(tokens) & FORBIDDEN_SANDBOX_TOKENS)
    unknown = sorted(set(tokens) - ALLOWED_SANDBOX_TOKENS - FORBIDDEN_SANDBOX_TOKENS)
    if forbidden or unknown:
        raise ValueError(
            f"preview sandbox {value!r} has tokens a preview must never get: {', '.join(forbidden + unknown)}; "
            f"only {', '.join(sorted(ALLOWED_SANDBOX_TOKENS))} is allowed (see babl_core/web/render.py)"
        )
    return value


# Checked at import, not with `assert` (which `python -O` removes).
check_sandbox(SANDBOX)
check_sandbox(SANDBOX_WITH_SCRIPTS)


def scripts_enabled() -> bool:
    """Whether previews run scripts: `BABL_PREVIEW_SCRIPTS=1`; off by default."""
    return env_flag(PREVIEW_SCRIPTS_ENV, default=False)


def sandbox_for(allow_scripts: bool) -> str:
    """The iframe sandbox attribute for a preview with or without scripts."""
    return check_sandbox(SANDBOX_WITH_SCRIPTS if allow_scripts else SANDBOX)


def content_security_policy(*, allow_scripts: bool = False) -> str:
    """The preview's CSP: nothing from the network, inline styles, `data:` images, fonts and media;
    inline scripts only with `allow_scripts`."""
    directives = [
        "default-src 'none'",
        "style-src 'unsafe-inline'",
        "img-src data:",
        "font-src data:",
        "media-src data:",
        "script-src 'unsafe-inline'" if allow_scripts else "script-src 'none'",
        "connect-src 'none'",
        "form-action 'none'",
        "frame-src 'none'",
        "child-src 'none'",
        "worker-src 'none'",
        "object-src 'none'",
        "manifest-src 'none'",
        "base-uri 'none'",
    ]
    return "; ".join(directives)


# Tags removed from the model's HTML, as (tag, attribute, values); None = the tag whatever it holds.
_STRIPPED_TAGS: dict[str, tuple[str, frozenset[str]] | None] = {
    "base": None,  # would re-point every relative URL
    "meta": ("http-equiv", frozenset({"refresh", "set-cookie"})),  # navigation without a script
    "link": ("rel", frozenset({"dns-prefetch", "preconnect", "prefetch", "prerender"})),  # not all under CSP
}
_TAG_START = re.compile(r"<(base|meta|link)(?=[\s/>])", re.IGNORECASE)
_LEADING_DOCTYPE = re.compile(r"^\ufeff?\s*(?:<!--.*?-->\s*)*(<!doctype[^>]*>)", re.IGNORECASE | re.DOTALL)
_WHITESPACE = " \t\n\f\r"


def _read_tag(text: str, pos: int) -> tuple[int, dict[str, str]]:
    """Reads a start tag's attributes the way the HTML tokenizer does (a quote inside an attribute
    name is part of the name; values may be quoted or not), from `pos` just after the tag name.
    Returns the offset after the tag and its attributes (names lower-cased, character references in
    values decoded, as the browser decodes them). An unfinished tag runs to the end of the text."""
    attrs: dict[str, str] = {}
    n = len(text)
    while pos < n:
        while pos < n and (text[pos] in _WHITESPACE or text[pos] == "/"):
            pos += 1
        if pos >= n:
            break
        if text[pos] == ">":
            return pos + 1, attrs
        name_start = pos
        pos += 1  # the first character, even "=", belongs to the name
        while pos < n and text[pos] not in _WHITESPACE and text[pos] not in "/>=":
            pos += 1
        name = text[name_start:pos].lower()
        while pos < n and text[pos] in _WHITESPACE:
            pos += 1
        value = ""
        if pos < n and text[pos] == "=":
            pos += 1
            while pos < n and text[pos] in _WHITESPACE:
                pos += 1
            if pos < n and text[pos] in "\"'":
                close = text.find(text[pos], pos + 1)
                close = n if close == -1 else close
                value, pos = text[pos + 1 : close], close + 1
            else:
                value_start = pos
                while pos < n and text[pos] not in _WHITESPACE and text[pos] != ">":
                    pos += 1
                value = text[value_start:pos]
        attrs.setdefault(name, html_lib.unescape(value))
    return n, attrs


def strip_unsafe_tags(html: str) -> str:
    """The model's HTML without `<base>`, `<meta http-equiv="refresh">` (and set-cookie), and
    `<link rel>` dns-prefetch/preconnect/prefetch/prerender: defence in depth behind the sandbox and
    the CSP. Each removed tag is replaced by an HTML comment saying so."""
    out: list[str] = []
    pos = 0
    for match in _TAG_START.finditer(html):
        if match.start() < pos:
            continue  # inside a tag already removed
        tag = match.group(1).lower()
        end, attrs = _read_tag(html, match.end())
        rule = _STRIPPED_TAGS[tag]
        if rule is not None:
            attribute, values = rule
            if not set(attrs.get(attribute, "").lower().split()) & values:
                continue
        out.append(html[pos : match.start()])
        out.append(f"<!-- removed by Babl: a <{tag}> tag -->")
        pos = end
    out.append(html[pos:])
    return "".join(out)


def _truncate_utf8(html: str, limit: int) -> str:
    cut = html.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
    last_tag_end = cut.rfind(">")
    return cut[: last_tag_end + 1] if last_tag_end > 0 else cut


def preview_document(html: str, *, allow_scripts: bool = False) -> str:
    """The `srcdoc` for the preview iframe.

    Our `<!DOCTYPE html>` comes first (a doctype after any tag is ignored and the page would
    render in quirks mode), then the CSP `<meta>` (it only governs what comes after it, so it
    precedes everything from the model), then the model's HTML with its own doctype removed and
    unsafe tags stripped (`strip_unsafe_tags`). A document over MAX_PREVIEW_BYTES is cut, with a
    visible note at the end.

    Args:
        html: The model's HTML (a full document or a fragment).
        allow_scripts: Allow inline scripts in the CSP. The iframe's sandbox must match
            (`sandbox_for(allow_scripts)`).
    """
    size = len(html.encode("utf-8"))
    body = strip_unsafe_tags(html)
    doctype = _LEADING_DOCTYPE.match(body)
    if doctype is not None:
        body = body[: doctype.start(1)] + body[doctype.end(1) :]
    note = ""
    if size > MAX_PREVIEW_BYTES:
        body = _truncate_utf8(body, MAX_PREVIEW_BYTES)
        # Close whatever raw-text element or comment the cut may have left open, so the note shows.
        note = (
            "--></textarea></title></style></script></noscript></xmp></template>"
            '<div style="font:14px sans-serif;background:#fff3cd;color:#000;padding:8px;border:1px solid #c90">'
            f"Preview truncated: showing the first {MAX_PREVIEW_BYTES // 1024} KiB of {size // 1024} KiB. "
            "Download the .html for the whole page.</div>"
        )
    csp = content_security_policy(allow_scripts=allow_scripts)  # no quote, `<` or `&`: no escaping needed
    head = (
        "<!DOCTYPE html>"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta http-equiv="x-dns-prefetch-control" content="off">'
        '<meta name="referrer" content="no-referrer">'
    )
    return head + body + note


# --- the custom element's props ---------------------------------------------------------------

_TITLE = re.compile(r"<title[^>]*>(.*?)</title\s*>", re.IGNORECASE | re.DOTALL)


def document_title(html: str) -> str | None:
    """The text of the document's `<title>`, whitespace collapsed, or None."""
    match = _TITLE.search(html)
    if match is None:
        return None
    title = " ".join(html_lib.unescape(match.group(1)).split())
    return title[:120] or None


def download_name(title: str, suffix: str = ".html") -> str:
    """A safe file name for a download: the title as an ASCII slug, `suffix` appended
    ("My Landing Page!" -> "my-landing-page.html"; empty -> "preview.html")."""
    title = re.sub(r"\.html?\s*$", "", title.strip(), flags=re.IGNORECASE)
    ascii_title = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_title.lower()).strip("-")[:60].strip("-")
    return f"{slug or 'preview'}{suffix}"


def download_mime() -> str:
    """The mime type of a downloaded page (`DOWNLOAD_MIME`; see there for why it is not HTML)."""
    return DOWNLOAD_MIME


def download_attachment(html: str, *, title: str) -> dict:
    """Keyword arguments for a `cl.File` offering the page as a download: name, content (UTF-8
    bytes) and the non-HTML mime. Always pass the mime: without one, Chainlit guesses text/html from
    the .html name and serves the page on the app's origin."""
    return {"name": download_name(title), "content": html.encode("utf-8"), "mime": DOWNLOAD_MIME}


def preview_props(
    html: str,
    *,
    final: bool,
    title: str,
    allow_scripts: bool | None = None,
    preview_id: str | None = None,
) -> dict:
    """The props of the `HtmlPreview` custom element (`public/elements/HtmlPreview.jsx`).

    Args:
        html: The model's HTML, as `extract_html` returned it.
        final: False while the answer streams, True for the last update. The download button is
            offered on the final update only (its copy of the page travels in `html`).
        title: Shown in the element's title bar and used for the download's file name.
        allow_scripts: Run the page's scripts; None reads BABL_PREVIEW_SCRIPTS (off by default).
        preview_id: A stable id for this preview (e.g. the message id); the element keeps its
            full-screen state and height under it across updates. Defaults to the title.

    Returns:
        A JSON-serializable dict: srcdoc, sandbox, final, title, bytes (the page's UTF-8 size),
        truncated, scripts, filename, html (the page itself when final, else None), preview_id.
    """
    scripts = scripts_enabled() if allow_scripts is None else allow_scripts
    size = len(html.encode("utf-8"))
    return {
        "srcdoc": preview_document(html, allow_scripts=scripts),
        "sandbox": sandbox_for(scripts),
        "final": final,
        "title": title,
        "bytes": size,
        "truncated": size > MAX_PREVIEW_BYTES,
        "scripts": scripts,
        "filename": download_name(title),
        "html": html if final else None,
        "preview_id": preview_id or title,
    }


class PreviewThrottle:
    """Decides when a streaming preview is updated: at most once per `min_interval_s`, only when
    the HTML changed, and always on the final update.

    Re-rendering an iframe reloads its page, and each update sends the whole document over the
    socket, so the preview follows the stream at a few frames a second while the chat text updates
    faster.

    Args:
        min_interval_s: The least time between two streaming updates.
        clock: Returns seconds (monotonic); tests pass a fake one.
    """

    def __init__(self, min_interval_s: float = 0.5, *, clock: Callable[[], float] = time.monotonic):
        if min_interval_s < 0:
            raise ValueError(
                f"min_interval_s={min_interval_s} must be >= 0 (seconds between preview updates)"
            )
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._last_time: float | None = None
        self._last_content: str | None = None

    def due(self, content: str, *, final: bool = False) -> bool:
        """Whether to send an update now for `content`; a True answer counts as sent.

        Args:
            content: The HTML the update would show.
            final: The stream has ended: always due.
        """
        now = self._clock()
        if not final:
            if content == self._last_content:
                return False
            if self._last_time is not None and now - self._last_time < self.min_interval_s:
                return False
        self._last_time, self._last_content = now, content
        return True
