"""Fixtures shared by the integration tests (beyond tests/conftest.py): the HTTPS webhook receiver, PostgreSQL."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from tests.integration.webhook_receiver import ca, ca_file, closed_port, receiver

__all__ = ["POSTGRES_DSN", "ca", "ca_file", "closed_port", "pg_schema", "postgres_dsn", "receiver"]

# The PostgreSQL server the tests use: the local one unless told otherwise.
POSTGRES_DSN = os.environ.get("AUTHPOOL_TEST_DATABASE_URL", "") or "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The test PostgreSQL server's DSN, once it answers.

    When none answers the PostgreSQL tests are skipped, with the reason, but
    only outside CI: with `CI` set they fail, so a CI job whose database did
    not come up cannot pass by skipping them.
    """
    try:
        psycopg.connect(POSTGRES_DSN, connect_timeout=3).close()
    except psycopg.Error as error:
        where = psycopg.conninfo.conninfo_to_dict(POSTGRES_DSN)
        reason = (
            f"no PostgreSQL server answers at {where.get('host')}:{where.get('port', 5432)}/{where.get('dbname')} "
            f"({type(error).__name__}); start one or point AUTHPOOL_TEST_DATABASE_URL at one"
        )
        if "CI" in os.environ:
            pytest.fail(f"{reason}. CI is set, so the PostgreSQL tests may not be skipped", pytrace=False)
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    return POSTGRES_DSN


@pytest.fixture
def pg_schema(postgres_dsn: str) -> Iterator[str]:
    """A schema name of this test's own (nothing is created); whatever it holds afterwards is dropped."""
    schema = f"authpool_test_{secrets.token_hex(6)}"
    try:
        yield schema
    finally:
        with psycopg.connect(postgres_dsn, autocommit=True, connect_timeout=3) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))
