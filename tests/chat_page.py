"""What the browser tests look for on the chat page."""

import re

ANSWERS = '[data-step-type="assistant_message"] .message-content'
"""Each answer's text."""
FOOTER = re.compile(r"([\w.-]+) · (\d+) tokens · \d+ tokens/s")
"""The line under a finished answer: model, tokens, speed (a regex Playwright also runs as JavaScript)."""
