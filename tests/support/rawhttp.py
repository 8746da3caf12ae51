"""A minimal HTTP/1.1 keep-alive client, for floods."""

from __future__ import annotations

from collections.abc import Mapping

import trio


class RawHttp:
    """A minimal HTTP/1.1 keep-alive client on one connection, for floods: httpx
    spends several times the server's CPU per request, and on a small machine the
    client would otherwise throttle the flood it is meant to produce. Responses
    must carry Content-Length (every answer of this service does)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._stream: trio.SocketStream | None = None
        self._buf = bytearray()

    async def request(self, method: str, path: str, headers: Mapping[str, str],
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        """Send one request; return (status, lower-cased headers, body). Raises
        ``ConnectionError`` (and drops the connection) if the server closes it."""
        try:
            if self._stream is None:
                self._stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                self._buf.clear()
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            await self._stream.send_all(
                f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Length: {len(body)}\r\n{head}\r\n".encode() + body)
            while (end := self._buf.find(b"\r\n\r\n")) < 0:
                await self._fill()
            lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
            del self._buf[: end + 4]
            status = int(lines[0].split(" ", 2)[1])
            fields = {k.strip().lower(): v.strip()
                      for k, _, v in (line.partition(":") for line in lines[1:])}
            length = int(fields.get("content-length", "0"))
            while len(self._buf) < length:
                await self._fill()
            data = bytes(self._buf[:length])
            del self._buf[:length]
            if fields.get("connection", "").lower() == "close":
                await self.aclose()
            return status, fields, data
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            await self.aclose()
            raise ConnectionError(str(exc)) from exc
        except ConnectionError:
            await self.aclose()
            raise

    async def _fill(self) -> None:
        assert self._stream is not None
        chunk = await self._stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self._buf += chunk

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()
