"""A unix-socket relay in front of a QEMU's QMP socket, whose connections a test can cut.

It stands for what drops a QMP session in the field (a management daemon restarted, a
socket closed by someone else) while QEMU itself keeps running -- and keeps migrating.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path


class QmpRelay:
    """Relay ``path`` -> ``target``; :meth:`cut` closes every current connection."""

    def __init__(self, path: Path, target: Path) -> None:
        self.path = path
        self.target = target
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.target))
        except OSError:
            writer.close()
            return
        self._writers += [writer, up_writer]
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, up_writer):
            w.close()

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    def cut(self) -> None:
        """Close every relayed connection (QEMU sees its client go; ours sees EOF)."""
        for w in self._writers:
            w.close()
        self._writers.clear()

    async def close(self) -> None:
        """Stop accepting and cut everything; nobody listens on ``path`` afterwards."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self.cut()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
