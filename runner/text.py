"""The one sanitiser for untrusted text: what a proposer (an LLM) wrote and what code under
test printed, before the runner prints it, writes it to results.tsv or events.jsonl, commits it,
or hands it to a model. Terminal escapes (CSI, OSC such as the clipboard-writing OSC 52), C0 and
C1 controls, DEL, and zero-width and bidirectional-override characters go; a line stays a line.
"""

from __future__ import annotations

import re

DESCRIPTION_MAX_CHARS = 200   # a results.tsv description, a commit subject, an [EXP] line's tail
HYPOTHESIS_MAX_CHARS = 1000

# ESC followed by a CSI sequence, an OSC string (to BEL or ST), or a two-character escape.
_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[ -~])")
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ufeff]")


def one_line(text: str, limit: int = DESCRIPTION_MAX_CHARS) -> str:
    """`text` as one printable line of at most `limit` characters."""
    text = _CONTROL.sub(" ", _ESCAPE.sub("", str(text).replace("\t", " ").replace("\n", " ")))
    return " ".join(text.split())[:limit]


def block(text: str, limit: int | None = None) -> str:
    """`text` with its lines kept but every escape and control character removed; the last
    `limit` characters when given (tails of logs)."""
    cleaned = "\n".join(_CONTROL.sub("", _ESCAPE.sub("", line)).replace("\t", " ") for line in str(text).splitlines())
    return cleaned if limit is None else cleaned[-limit:]


def redact_url(url: str) -> str:
    """`url` as `scheme://host[:port]` only: a webhook's path, query and userinfo often are its
    secret, and never reach a log, an event or a report."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(str(url))
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # an unparseable port or host: nothing of it is shown
        return "(unparseable URL)"
    return f"{parts.scheme}://{host}{port}" if parts.scheme and host else "(URL without scheme://host)"
