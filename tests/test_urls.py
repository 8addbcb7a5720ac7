"""Tests for qbportsync.urls: URLs printed without their secrets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from qbportsync.urls import redact

_SECRETS = st.text(
    st.characters(blacklist_characters="@?#", blacklist_categories=("Cs",)),
    min_size=4,
).filter(lambda s: s not in "https://***@qb.example:8080/?token=#***")


class RedactTests(SynchronousTestCase):
    """redact() hides credentials, query and fragment, and keeps the rest."""

    def test_forms(self) -> None:
        """Each part that may hold a secret is replaced by ***; the rest stays."""
        for url, expected in [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
            ("https://qb.example/qbt/api/v2", "https://qb.example/qbt/api/v2"),
            ("http://admin:pw@qb.example:8080/x", "http://***@qb.example:8080/x"),
            ("https://qb.example/?apikey=k", "https://qb.example/?***"),
            ("https://qb.example/x#token", "https://qb.example/x#***"),
            ("http://u:p@h/x?q#f", "http://***@h/x?***"),
            ("http://u:pa/ss@h/x", "http://***@h/x"),
            ("http://a@b@h", "http://***@h"),
            ("user:pw@host", "***@host"),
            ("", ""),
        ]:
            self.assertEqual(redact(url), expected, url)

    @given(_SECRETS, st.sampled_from(["http", "https", ""]))
    def test_neverEchoes(self, secret: str, scheme: str) -> None:
        """A secret in the user info, the query or the fragment never shows."""
        prefix = f"{scheme}://" if scheme else ""
        for url in [
            f"{prefix}admin:{secret}@qb.example:8080/",
            f"{prefix}qb.example/?token={secret}",
            f"{prefix}qb.example/#{secret}",
            f"{prefix}{secret}@qb.example",
        ]:
            self.assertNotIn(secret, redact(url), url)
