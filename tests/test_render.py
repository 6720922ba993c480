"""Unit tests for babl_core.web.render: answers per task, the preview document, sandbox and throttle."""

from __future__ import annotations

import json
import re

import html5lib
import pytest

from babl_core.web import render
from babl_core.web.render import (
    DOWNLOAD_MIME,
    MAX_PREVIEW_BYTES,
    SANDBOX,
    PreviewThrottle,
    check_sandbox,
    content_security_policy,
    document_title,
    download_attachment,
    download_mime,
    download_name,
    extract_html,
    format_answer,
    preview_document,
    preview_props,
    sandbox_for,
    strip_unsafe_tags,
)

PAGE = (
    "<!DOCTYPE html>\n<html>\n<head><title>Bakery</title></head>\n<body><h1>Fresh bread</h1></body>\n</html>"
)
FENCED = f"Here is the page:\n\n```html\n{PAGE}\n```\n\nIt uses no scripts."


def fences_closed(markdown: str) -> bool:
    return all(fence.closed for fence in render._scan_fences(markdown))


# --- extract_html ------------------------------------------------------------------------------


def test_extract_html_from_fenced_block_drops_the_prose():
    assert extract_html(FENCED) == PAGE


def test_extract_html_takes_the_first_html_block_not_other_languages():
    text = "```css\nh1 { color: red }\n```\n```HTML\n<p>one</p>\n```\n```html\n<p>two</p>\n```"
    assert extract_html(text) == "<p>one</p>"


def test_extract_html_unterminated_block_counts_only_while_streaming():
    streaming = "Sure:\n```html\n<div><p>Hello"
    assert extract_html(streaming, partial=True) == "<div><p>Hello"
    assert extract_html(streaming) is None


def test_extract_html_partial_block_with_nothing_yet_is_none():
    assert extract_html("Sure:\n```html\n", partial=True) is None


def test_extract_html_raw_document_in_prose():
    text = f"Of course! {PAGE.replace('<!DOCTYPE html>', '<!doctype HTML>')} Hope it helps."
    found = extract_html(text)
    assert found.startswith("<!doctype HTML>") and found.endswith("</html>")
    assert "Hope it helps" not in found


def test_extract_html_raw_html_tag_without_doctype_runs_to_the_end_while_streaming():
    assert extract_html("Here: <HTML lang='en'><body><h1>Hi", partial=True) == "<HTML lang='en'><body><h1>Hi"


def test_extract_html_raw_document_inside_an_unlabelled_fence_stops_at_the_fence():
    text = "```\n<!DOCTYPE html><body>x\n```\nthen prose"
    assert extract_html(text) == "<!DOCTYPE html><body>x"


def test_extract_html_ignores_fence_text_in_the_middle_of_a_line_and_plain_prose():
    assert extract_html("Use a ```html fence like this.") is None
    assert extract_html("HTML stands for HyperText Markup Language.") is None


def test_extract_html_tilde_fence_and_longer_fence_holding_backticks():
    assert extract_html("~~~html\n<p>t</p>\n~~~") == "<p>t</p>"
    inner = "<pre>```js\nx()\n```</pre>"
    assert extract_html(f"````html\n{inner}\n````") == inner


def test_extract_html_accepts_crlf():
    assert extract_html("```html\r\n<p>x</p>\r\n```\r\n") == "<p>x</p>"


# --- format_answer ------------------------------------------------------------------------------


def test_format_html_already_fenced_is_not_double_fenced():
    assert format_answer("html", FENCED) == FENCED


def test_format_html_raw_document_is_fenced_and_prose_kept():
    shown = format_answer("html", f"Here you go:\n{PAGE}\nEnjoy!")
    assert shown == f"Here you go:\n\n```html\n{PAGE}\n```\n\nEnjoy!"


def test_format_html_fragment_is_fenced_and_prose_left_alone():
    assert format_answer("html", "<div class='card'>Hi</div>") == "```html\n<div class='card'>Hi</div>\n```"
    assert format_answer("html", "I cannot do that.") == "I cannot do that."


def test_format_html_document_holding_backticks_gets_a_longer_fence():
    page = "<html><body><pre>```</pre></body></html>"
    shown = format_answer("html", page)
    assert shown.startswith("````html\n") and shown.endswith("\n````")
    assert extract_html(shown) == page


def test_format_html_document_in_an_unlabelled_fence_is_kept():
    text = f"```\n{PAGE}\n```"
    assert format_answer("html", text) == text


def test_format_streaming_open_fence_is_closed():
    shown = format_answer("html", "Sure:\n```html\n<body><h1>Hi", partial=True)
    assert shown == "Sure:\n```html\n<body><h1>Hi\n```"


def test_format_streaming_raw_document_is_fenced_to_the_end():
    shown = format_answer("html", "Sure: <!DOCTYPE html><body><h1>Hi", partial=True)
    assert shown == "Sure:\n\n```html\n<!DOCTYPE html><body><h1>Hi\n```"


def test_format_streaming_holds_back_a_fence_being_typed():
    assert format_answer("chat", "Look:\n``", partial=True) == "Look:"
    assert format_answer("chat", "Look:\n``", partial=False) == "Look:\n``"
    assert format_answer("chat", "inline `code", partial=True) == "inline `code"  # not a fence


def test_format_every_prefix_of_a_streamed_answer_is_safe():
    answer = f"Intro text.\n\n```html\n{PAGE}\n```\n\nMore prose, and a snippet:\n~~~\nx = 1\n~~~\nDone."
    for task in ("html", "chat", "python"):
        for end in range(len(answer) + 1):
            shown = format_answer(task, answer[:end], partial=True)
            assert fences_closed(shown), (task, answer[:end])
    assert format_answer("html", answer) == answer


def test_format_python_and_code_are_fenced_once():
    code = "def add(a, b):\n    return a + b\n"
    assert format_answer("python", code) == "```python\ndef add(a, b):\n    return a + b\n```"
    assert format_answer("code", code) == format_answer("python", code)
    fenced = "Here:\n```python\nprint(1)\n```"
    assert format_answer("python", fenced) == fenced


def test_format_python_streaming_and_code_holding_a_fence():
    assert format_answer("python", "def f():\n    ret", partial=True) == "```python\ndef f():\n    ret\n```"
    code = 's = """\n```\n"""'
    shown = format_answer("python", code)
    assert shown.startswith("````python\n") and fences_closed(shown)
    assert render._scan_fences(shown)[0].body_start == len("````python\n")


def test_format_email_keeps_paragraphs_and_line_breaks():
    email = "Dear Ana,\nthe report is attached.\n\n\nBest regards,\nLuis\n"
    assert format_answer("email", email) == "Dear Ana,  \nthe report is attached.\n\nBest regards,  \nLuis"


def test_format_qa_and_chat_are_as_written():
    text = "Paris is the capital of **France**.\n\n- a\n- b"
    assert format_answer("qa", text) == text
    assert format_answer("chat", text) == text


@pytest.mark.parametrize("task", ["qa", "chat", "email", "html", "python"])
@pytest.mark.parametrize("text", [">", "> > >\n>", "---", "# ", "***", "|  |", "``"])
def test_an_answer_made_only_of_markdown_syntax_is_shown_as_written(task, text):
    # As Markdown these render nothing readable (an empty quote, heading, rule or table).
    assert format_answer(task, text) == f"```text\n{text.strip(chr(10))}\n```"


def test_text_with_a_quote_mark_is_still_markdown():
    assert format_answer("qa", "> quoted") == "> quoted"


def test_format_empty_answer_is_empty_and_unknown_task_is_refused():
    assert format_answer("python", "  \n") == ""
    with pytest.raises(ValueError, match=r"'poem'.*task"):
        format_answer("poem", "x")


# --- preview_document --------------------------------------------------------------------------


def parse(document: str):
    return html5lib.parse(document, namespaceHTMLElements=False)


def test_preview_csp_meta_is_first_and_governs_everything():
    document = preview_document(PAGE)
    assert document.startswith('<!DOCTYPE html><meta http-equiv="Content-Security-Policy" content="')
    head = parse(document).find("head")
    first = head[0]
    assert first.tag == "meta" and first.get("http-equiv") == "Content-Security-Policy"
    # One doctype only (a second, late one would be ignored by the parser anyway).
    assert len(re.findall("<!doctype", document, re.IGNORECASE)) == 1
    assert parse(document).find("head/title").text == "Bakery"


def test_preview_csp_directives_without_and_with_scripts():
    csp = content_security_policy()
    directives = dict(d.split(" ", 1) for d in csp.split("; "))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'none'"
    assert directives["style-src"] == "'unsafe-inline'"
    assert directives["img-src"] == "data:" and directives["font-src"] == "data:"
    for name in ("connect-src", "form-action", "frame-src", "base-uri", "object-src"):
        assert directives[name] == "'none'", name
    assert not re.search(r"https?:|\*|'self'", csp)
    scripted = dict(d.split(" ", 1) for d in content_security_policy(allow_scripts=True).split("; "))
    assert scripted["script-src"] == "'unsafe-inline'"
    assert scripted["connect-src"] == "'none'"
    assert "unsafe-eval" not in content_security_policy(allow_scripts=True)
    assert f'content="{content_security_policy(allow_scripts=True)}"' in preview_document(
        PAGE, allow_scripts=True
    )


@pytest.mark.parametrize(
    "tag",
    [
        '<meta http-equiv="refresh" content="0;url=http://127.0.0.1:1/x">',
        "<META HTTP-EQUIV=Refresh CONTENT='0;url=http://127.0.0.1:1/x'>",
        "<meta/http-equiv=refresh/content=0;url=http://127.0.0.1:1/x>",
        '<meta content="0;url=http://127.0.0.1:1/x>y" http-equiv="refresh">',
        '<meta http-equiv="&#x72;efresh" content="0;url=http://127.0.0.1:1/x">',
        '<meta x" http-equiv=refresh content="0;url=http://127.0.0.1:1/x">',
        '<meta\nhttp-equiv\n=\n"refresh"\ncontent="1">',
        '<base href="http://127.0.0.1:1/">',
        "<BASE target=_top>",
        '<link rel="dns-prefetch" href="//leak.example">',
        '<link rel="preconnect prefetch" href="http://127.0.0.1:1/">',
    ],
)
def test_preview_strips_refresh_base_and_prefetch_as_a_browser_parses_them(tag):
    document = preview_document(f"<html><head>{tag}<meta charset='utf-8'></head><body>ok</body></html>")
    tree = parse(document)
    for meta in tree.iter("meta"):
        assert (meta.get("http-equiv") or "").lower() != "refresh"
    assert not list(tree.iter("base"))
    for link in tree.iter("link"):
        assert not {"dns-prefetch", "preconnect", "prefetch"} & set((link.get("rel") or "").split())
    assert [m.get("charset") for m in tree.iter("meta") if m.get("charset")] == ["utf-8"]
    assert tree.find("body").text == "ok"


def test_strip_keeps_harmless_tags_and_text_byte_for_byte():
    html = '<head><meta name="viewport" content="width=device-width"><link rel=stylesheet href=a.css></head>x'
    assert strip_unsafe_tags(html) == html


def test_preview_truncates_absurdly_large_documents_with_a_note():
    row = "<p>" + "é" * 100 + "</p>\n"
    big = "<html><body>" + row * (MAX_PREVIEW_BYTES // len(row.encode()) + 50) + "</body></html>"
    document = preview_document(big)
    assert len(document.encode()) < MAX_PREVIEW_BYTES + 2048
    assert "Preview truncated" in document
    body_text = "".join(parse(document).find("body").itertext())
    assert "Preview truncated" in body_text  # not swallowed by an open element
    assert "Preview truncated" not in preview_document(row * 10)


# --- sandbox -----------------------------------------------------------------------------------


def test_sandbox_never_lets_the_page_out():
    for value in (SANDBOX, sandbox_for(False), sandbox_for(True)):
        tokens = value.lower().split()
        for forbidden in ("allow-same-origin", "allow-top-navigation", "allow-popups", "allow-forms"):
            assert forbidden not in tokens
    assert sandbox_for(True) == "allow-scripts"
    assert sandbox_for(False) == SANDBOX == ""


@pytest.mark.parametrize(
    "value",
    [
        "allow-same-origin",
        "allow-scripts allow-same-origin",
        "ALLOW-SAME-ORIGIN",
        "allow-popups",
        "allow-forms",
        "allow-top-navigation",
        "allow-popups-to-escape-sandbox",
        "allow-modals",
    ],
)
def test_check_sandbox_refuses(value):
    with pytest.raises(ValueError, match="never"):
        check_sandbox(value)


def test_element_jsx_enforces_the_same_sandbox_rules_and_never_injects_html():
    jsx = (render.__file__.rsplit("/babl_core/", 1)[0] + "/public/elements/HtmlPreview.jsx").strip()
    with open(jsx, encoding="utf-8") as handle:
        source = handle.read()
    allowed = re.search(r"ALLOWED_SANDBOX_TOKENS = \[([^\]]*)\]", source).group(1)
    assert sorted(re.findall(r"'([^']+)'", allowed)) == sorted(render.ALLOWED_SANDBOX_TOKENS)
    assert "dangerouslySetInnerHTML" not in source
    assert "sandbox={props.sandbox}" in source and "srcDoc={props.srcdoc}" in source
    assert f"const DOWNLOAD_TYPE = '{DOWNLOAD_MIME}'" in source


# --- props, download, title --------------------------------------------------------------------


def test_preview_props_streaming_and_final(monkeypatch):
    monkeypatch.delenv("BABL_PREVIEW_SCRIPTS", raising=False)
    streaming = preview_props(PAGE, final=False, title="Bakery", preview_id="msg-1")
    assert streaming["srcdoc"] == preview_document(PAGE)
    assert streaming["sandbox"] == SANDBOX and streaming["scripts"] is False
    assert streaming["final"] is False and streaming["html"] is None
    assert streaming["bytes"] == len(PAGE.encode()) and streaming["truncated"] is False
    assert streaming["filename"] == "bakery.html" and streaming["preview_id"] == "msg-1"
    final = preview_props(PAGE, final=True, title="Bakery")
    assert final["html"] == PAGE and final["preview_id"] == "Bakery"
    assert json.loads(json.dumps(final)) == final


def test_preview_props_scripts_follow_the_setting(monkeypatch):
    monkeypatch.setenv("BABL_PREVIEW_SCRIPTS", "1")
    props = preview_props(PAGE, final=True, title="x")
    assert props["scripts"] is True and props["sandbox"] == "allow-scripts"
    assert "script-src 'unsafe-inline'" in props["srcdoc"]
    assert preview_props(PAGE, final=True, title="x", allow_scripts=False)["sandbox"] == ""


def test_download_name_and_mime():
    assert download_name("My Landing Page!") == "my-landing-page.html"
    assert download_name("Café — menu.html") == "cafe-menu.html"
    assert download_name("../../etc/passwd") == "etc-passwd.html"
    assert download_name("  ") == download_name("日本語") == "preview.html"
    assert len(download_name("x" * 500)) <= 65
    assert download_mime() == DOWNLOAD_MIME
    assert "html" not in download_mime()
    attachment = download_attachment("<p>é</p>", title="Menu")
    assert attachment == {"name": "menu.html", "content": "<p>é</p>".encode(), "mime": DOWNLOAD_MIME}


def test_document_title():
    assert document_title(PAGE) == "Bakery"
    assert document_title("<TITLE>\n Tom &amp; Jerry\n</title>") == "Tom & Jerry"
    assert document_title("<p>no title</p>") is None


# --- throttle ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_throttle_limits_streaming_updates_and_always_passes_the_final():
    clock = FakeClock()
    throttle = PreviewThrottle(0.5, clock=clock)
    assert throttle.due("<p>a") is True  # the first update shows at once
    clock.now += 0.2
    assert throttle.due("<p>ab") is False
    clock.now += 0.29
    assert throttle.due("<p>abc") is False
    clock.now += 0.01
    assert throttle.due("<p>abcd") is True  # 0.5 s after the last update
    clock.now += 0.1
    assert throttle.due("<p>abcde", final=True) is True  # final: at once
    assert throttle.due("<p>abcde", final=True) is True


def test_throttle_skips_unchanged_content():
    clock = FakeClock()
    throttle = PreviewThrottle(0.5, clock=clock)
    assert throttle.due("<p>a")
    clock.now += 5
    assert throttle.due("<p>a") is False
    assert throttle.due("<p>b") is True


def test_throttle_counts_from_the_last_sent_update():
    clock = FakeClock()
    throttle = PreviewThrottle(1.0, clock=clock)
    sent = []
    for step in range(40):  # 5 s of tokens every 0.125 s (exact in binary floating point)
        if throttle.due(f"<p>{step}"):
            sent.append(clock.now - 100.0)
        clock.now += 0.125
    assert sent == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_throttle_refuses_a_negative_interval():
    with pytest.raises(ValueError, match="min_interval_s"):
        PreviewThrottle(-1)


@pytest.mark.parametrize("task", ["chat", "qa", "email", "html", "python"])
def test_images_in_answers_become_links_and_code_is_left_alone(task):
    leak = "http://127.0.0.1:9/leak?q=the+conversation"
    answer = (
        f"Here ![a chart]({leak}) and ![ref] and ![][r2] then \\![not an image](x) and `![kept](in code)`.\n\n"
        f"[r2]: {leak}\n\n"
        "```python\nprint('![kept too](in a fence)')\n```\n"
    )
    shown = format_answer(task, answer)
    assert f"[a chart]({leak})" in shown and "![a chart]" not in shown
    assert "[ref]" in shown and "![ref]" not in shown and "![][r2]" not in shown
    assert "\\![not an image](x)" in shown
    assert "`![kept](in code)`" in shown and "print('![kept too](in a fence)')" in shown
    streamed = format_answer(task, answer[: answer.index(" and ![ref]")], partial=True)
    if task != "python":  # python: unfenced text so far is shown as a code block, as is
        assert "![" not in streamed


def test_images_inside_an_unclosed_fence_stay_code_while_streaming():
    shown = format_answer("chat", "```md\n![x](http://a/b)", partial=True)
    assert "![x](http://a/b)" in shown
