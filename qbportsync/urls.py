"""
URLs as we may print them: a log line or an error message names the server,
never the credentials or the tokens a URL can carry.
"""

from __future__ import annotations

HIDDEN = "***"
"""What stands in for a user name and password, a query or a fragment."""


def redact(url: str) -> str:
    """
    C{url} fit to print: C{user:password@} becomes C{***@}, a query string
    C{?***} and a fragment C{#***}, since any of them may hold a secret.  It
    works on text that is not a valid URL too, because that is what error
    messages are about.
    """
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    cut = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=-1)
    tail = ""
    if cut >= 0:
        tail = rest[cut] + HIDDEN
        rest = rest[:cut]
    if "@" in rest:
        # Up to the last "@", not the first "/": a password may hold a "/".
        rest = f"{HIDDEN}@{rest.rpartition('@')[2]}"
    return scheme + separator + rest + tail
