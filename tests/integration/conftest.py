"""Fixtures shared by the integration tests (beyond tests/conftest.py): the HTTPS webhook receiver."""

from tests.integration.webhook_receiver import ca, ca_file, closed_port, receiver

__all__ = ["ca", "ca_file", "closed_port", "receiver"]
