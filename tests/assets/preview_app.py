"""A minimal Chainlit app for tests/test_preview_browser.py: shows the HtmlPreview custom element
the way the real app does (a streaming update, then the final one), plus one element whose sandbox
was tampered with, which the element must refuse to render.

Run by the test as `chainlit run tests/assets/preview_app.py` from the repo root (so that
`public/elements/HtmlPreview.jsx` and `.chainlit/config.toml` are the project's own).
"""

import os

import chainlit as cl
from chainlit.server import app

from babl_core.web import page_policy
from babl_core.web.render import extract_html, format_answer, preview_props

page_policy.install(app)  # the app page's Content-Security-Policy, as app.py serves it

LEAK_URL = os.environ["BABL_TEST_LEAK_URL"]
TITLE = "Hostile page"

PAGE = f"""<!DOCTYPE html>
<html><head><title>{TITLE}</title>
<meta http-equiv="refresh" content="0;url={LEAK_URL}leak-refresh">
<link rel="stylesheet" href="{LEAK_URL}leak-stylesheet">
<style>body {{ background: #eef url("{LEAK_URL}leak-background"); font-family: sans-serif; }}</style>
</head><body>
<h1 id="headline">Hostile page rendered</h1>
<img src="{LEAK_URL}leak-img" alt="remote">
<script>document.getElementById("headline").textContent = "script ran"; fetch("{LEAK_URL}leak-fetch");</script>
<p id="last">The last part</p>
</body></html>"""

ANSWER = f"Here is the page:\n\n```html\n{PAGE}\n```\n"
STREAMED = ANSWER[: ANSWER.index('<p id="last">')]


@cl.on_chat_start
async def start() -> None:
    html = extract_html(STREAMED, partial=True)
    element = cl.CustomElement(
        name="HtmlPreview", props=preview_props(html, final=False, title=TITLE, preview_id="p1")
    )
    # The element is sent on its own, not in message.elements: Message.update() re-sends every element
    # it holds, and the chat text updates far more often than the (throttled) preview should.
    message = cl.Message(content=format_answer("html", STREAMED, partial=True))
    await message.send()
    await element.send(for_id=message.id)
    cl.user_session.set("preview", (message, element))

    tampered = preview_props("<h1>tampered</h1>", final=True, title="tampered")
    tampered["sandbox"] = "allow-scripts allow-same-origin"
    await cl.Message(
        content="tampered", elements=[cl.CustomElement(name="HtmlPreview", props=tampered)]
    ).send()


@cl.on_message
async def finish(_: cl.Message) -> None:
    """Any user message ends the 'stream': the final update of the same element."""
    message, element = cl.user_session.get("preview")
    element.props = preview_props(extract_html(ANSWER), final=True, title=TITLE, preview_id="p1")
    await element.update()
    message.content = format_answer("html", ANSWER)
    await message.update()
