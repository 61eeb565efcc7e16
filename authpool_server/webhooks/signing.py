"""Standard Webhooks signatures: the `whsec_` secret and the `webhook-signature` header.

The signed content is ``f"{msg_id}.{timestamp}.{body}"`` and the header value is
``v1,<base64 HMAC-SHA256>`` (https://www.standardwebhooks.com). A receiver
verifies it with any Standard Webhooks library, for example in Python::

    from standardwebhooks import Webhook
    payload = Webhook("whsec_...").verify(raw_body, request_headers)

or by hand: recompute the HMAC over ``webhook-id``, ``.``, ``webhook-timestamp``,
``.`` and the raw body bytes, compare it in constant time with each ``v1,``
entry of ``webhook-signature`` (space separated), and reject timestamps more
than a few minutes from now (replays). Drop repeats by ``webhook-id``:
delivery is at least once.

Small enough to write here rather than depend on a library; the tests check it
against the reference implementation.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

__all__ = ["MIN_KEY_BYTES", "SECRET_PREFIX", "WebhookSecret", "generate_secret", "sign"]

SECRET_PREFIX = "whsec_"  # noqa: S105  (the form's prefix, not a secret)
# The Standard Webhooks spec: secrets are random, between 24 and 64 bytes.
MIN_KEY_BYTES = 24


class WebhookSecret:
    """The key that signs webhooks; its repr never shows it.

    Build one with `parse` from the ``whsec_<base64>`` text an environment
    variable or a secret file holds.
    """

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"webhook secret key is shorter than {MIN_KEY_BYTES} bytes")
        self._key = bytes(key)

    @classmethod
    def parse(cls, text: str) -> WebhookSecret:
        """Read ``whsec_<base64>``; surrounding whitespace (a file's newline) is ignored.

        Raises:
            ValueError: the text is not of that form, or the key is too short.
                The message never repeats the text.
        """
        text = text.strip()
        if not text.startswith(SECRET_PREFIX):
            raise ValueError(f"webhook secret must be of the form {SECRET_PREFIX}<base64 key>")
        encoded = text.removeprefix(SECRET_PREFIX)
        try:
            # Accept unpadded base64 as the reference libraries do; extra padding is ignored.
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"webhook secret is not valid base64 after {SECRET_PREFIX}") from None
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(
                f"webhook secret key is shorter than {MIN_KEY_BYTES} bytes; "
                f'generate one with: python -c \'import base64, os; print("{SECRET_PREFIX}" + '
                f"base64.b64encode(os.urandom(32)).decode())'"
            )
        return cls(key)

    def mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of `data` under this key."""
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "WebhookSecret(<redacted>)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WebhookSecret):
            return NotImplemented
        return hmac.compare_digest(self._key, other._key)

    def __hash__(self) -> int:
        return hash(hashlib.sha256(self._key).digest())

    def __reduce__(self) -> object:
        # A pickled secret would carry the key to wherever the pickle goes.
        raise TypeError("a WebhookSecret cannot be pickled")

    # Immutable, so copies (a deep copy of a settings object, say) can share it.
    def __copy__(self) -> WebhookSecret:
        return self

    def __deepcopy__(self, memo: object) -> WebhookSecret:
        return self


def generate_secret() -> str:
    """A new random secret in ``whsec_<base64>`` form (32 bytes), for an operator to install."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def sign(secret: WebhookSecret, msg_id: str, timestamp: int, body: str) -> str:
    """The ``webhook-signature`` header value for one delivery attempt.

    Args:
        secret: The signing key.
        msg_id: The ``webhook-id`` header: the notification's id, the same on every attempt.
        timestamp: The ``webhook-timestamp`` header, POSIX seconds.
        body: The request body exactly as sent.

    Returns:
        ``v1,<base64 HMAC-SHA256 of "{msg_id}.{timestamp}.{body}">``.
    """
    digest = secret.mac(f"{msg_id}.{timestamp}.{body}".encode())
    return "v1," + base64.b64encode(digest).decode("ascii")
