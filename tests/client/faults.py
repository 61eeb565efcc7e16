"""A TCP proxy that loses a response on the wire, as a dropped connection does.

It forwards bytes both ways between a client and the server. When armed, it
watches the server's HTTP/2 frames and, at the first HEADERS frame of a call
(the start of its response, sent once the server has done the work), cuts
both connections instead of forwarding it. The client has sent its request
and had it served, but sees only a broken connection: UNAVAILABLE, with no
response headers, which is exactly the case the channel's retry policy
retries, by sending the same request again.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

__all__ = ["ResponseDroppingProxy"]

_FRAME_HEADER = 9  # length (24 bits), type, flags, stream id (31 bits)
_HEADERS = 0x1


class ResponseDroppingProxy:
    """Listens on 127.0.0.1 (ephemeral port) and forwards to `upstream_port`; runs on the caller's loop."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.to_drop = 0
        self.dropped = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def drop_next_response(self) -> None:
        self.to_drop += 1

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers |= {client_writer, server_writer}
        try:
            await asyncio.gather(
                self._pipe(client_reader, server_writer),
                self._frames(server_reader, client_writer),
            )
        finally:
            for writer in (client_writer, server_writer):
                writer.transport.abort()
                self._writers.discard(writer)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()

    async def _frames(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Server to client, frame by frame (the server sends no preface beyond frames)."""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                header = await reader.readexactly(_FRAME_HEADER)
                length = int.from_bytes(header[:3], "big")
                frame_type = header[3]
                stream_id = struct.unpack(">I", header[5:9])[0] & 0x7FFF_FFFF
                payload = await reader.readexactly(length)
                if frame_type == _HEADERS and stream_id != 0 and self.to_drop > 0:
                    self.to_drop -= 1
                    self.dropped += 1
                    break  # the response is lost with the connection
                writer.write(header + payload)
                await writer.drain()
        writer.transport.abort()
