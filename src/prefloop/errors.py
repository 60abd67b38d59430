"""The one error type the CLI turns into a one-line message and a non-zero exit."""

import re


class PrefloopError(Exception):
    """A user-facing problem: the message names the file, line or field, and the fix."""


_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s]*@")


def redact_url(text: str) -> str:
    """`text` with the credentials of every URL in it (http://user:key@host) replaced by ***:
    what prefloop prints or writes never holds them."""
    return _USERINFO.sub(r"\1***@", text)
