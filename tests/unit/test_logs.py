"""Log lines: the guide's JSON shape, emails masked, and batched writes that still arrive."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from authpool_server.logs import BufferedStreamHandler, JsonFormatter, TextFormatter, mask_emails


def test_the_guides_json_shape_with_context() -> None:
    record = logging.makeLogRecord(
        {"name": "AllocationBalancer", "levelno": logging.INFO, "levelname": "INFO", "msg": "Allocated session"}
    )
    record.context = {"clientId": "client-123", "subscriptionId": "prod-sub2"}
    entry = json.loads(JsonFormatter().format(record))
    assert list(entry) == ["timestamp", "level", "module", "message", "context"]
    assert entry["timestamp"].endswith("Z")
    assert entry["context"] == {"clientId": "client-123", "subscriptionId": "prod-sub2"}


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("owner team+sub1@company.com is over", "owner t***@company.com is over"),
        ('{"email": "alice@example.co.uk"}', '{"email": "a***@example.co.uk"}'),
        ("no address here, just @mentions", "no address here, just @mentions"),
    ],
)
def test_emails_are_masked_wherever_they_appear(text: str, masked: str) -> None:
    assert mask_emails(text) == masked
    record = logging.makeLogRecord({"msg": text, "levelname": "INFO"})
    record.context = {"who": text}
    assert "team+sub1@" not in JsonFormatter().format(record)
    assert "alice@" not in TextFormatter().format(record)


def _handler(tmp_path: Path, interval: float) -> tuple[BufferedStreamHandler, Path]:
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        handler = BufferedStreamHandler(fd, interval=interval)  # writes to its own copy of fd
    finally:
        os.close(fd)
    handler.setFormatter(JsonFormatter())
    return handler, path


def _emit(handler: BufferedStreamHandler, level: int, message: str) -> None:
    handler.handle(logging.makeLogRecord({"msg": message, "levelno": level, "levelname": logging.getLevelName(level)}))


def test_info_lines_are_batched_then_flushed_within_the_interval(tmp_path: Path) -> None:
    handler, path = _handler(tmp_path, interval=0.2)
    try:
        _emit(handler, logging.INFO, "first")
        assert path.read_text() == ""  # not one write per line
        deadline = time.monotonic() + 5
        while "first" not in path.read_text():
            assert time.monotonic() < deadline, "the line never reached the file"
            time.sleep(0.05)
    finally:
        handler.close()


def test_warnings_are_written_at_once_and_close_writes_the_rest(tmp_path: Path) -> None:
    handler, path = _handler(tmp_path, interval=60)
    _emit(handler, logging.INFO, "quiet")
    _emit(handler, logging.WARNING, "loud")
    assert [json.loads(line)["message"] for line in path.read_text().splitlines()] == ["quiet", "loud"]
    _emit(handler, logging.INFO, "last")
    handler.close()
    assert path.read_text().splitlines()[-1].find('"last"') > 0
