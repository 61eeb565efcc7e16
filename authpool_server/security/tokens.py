"""Bearer tokens, kept only as BLAKE2b digests and compared in constant time.

The plaintext is read once, from an environment variable or a mounted secret
file, hashed, and dropped. A presented token is hashed and compared with every
known digest without stopping at the first match, so the time taken says
nothing about which token (if any) was close.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from authpool_server.security.roles import Principal

__all__ = ["MIN_TOKEN_LENGTH", "TokenDirectory", "split_tokens"]

# 16 characters of `openssl rand -hex 32` output is 64 bits; shorter is a password, not a token.
MIN_TOKEN_LENGTH = 16


def _digest(token: str) -> bytes:
    # BLAKE2b (RFC 7693) is as sound as SHA-256 for this, and built into CPython: SHA-256
    # goes through OpenSSL's provider machinery, which cost ~10 µs more of server CPU per
    # call. Tokens are random and long (MIN_TOKEN_LENGTH), so a fast hash is the right one.
    return hashlib.blake2b(token.encode(), digest_size=32).digest()


def split_tokens(text: str) -> list[str]:
    """Several tokens may share one variable or file (whitespace or comma separated) for rotation."""
    return [token for token in text.replace(",", " ").split() if token]


class TokenDirectory:
    """Maps tokens to principals without keeping a token."""

    __slots__ = ("_entries",)

    def __init__(self, entries: Iterable[tuple[str, Principal]] = ()) -> None:
        self._entries: tuple[tuple[bytes, Principal], ...] = tuple((_digest(t), p) for t, p in entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TokenDirectory({len(self._entries)} tokens)"

    def principal(self, token: str) -> Principal | None:
        presented = _digest(token)
        found = None
        for digest, principal in self._entries:
            if hmac.compare_digest(digest, presented):
                found = principal
        return found

    def principals(self) -> set[str]:
        return {principal.name for _, principal in self._entries}
