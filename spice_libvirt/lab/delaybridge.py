"""A userspace layer-2 bridge that delays every frame: the lab's replacement for ``netem``.

This kernel has no ``sch_netem`` (and no ``fq``), so the lab cannot give the client's link a
round-trip time with ``tc``. Instead a small namespace sits between the client and the lab
switch, and this program forwards frames between its two interfaces, holding each one for
RTT/2 in each direction (which is what netem on both ends would do).

Why it looks the way it does:

* ``AF_PACKET`` sockets with ``PACKET_VNET_HDR``: veths hand us GSO super-frames and frames
  with ``CHECKSUM_PARTIAL``; with the virtio-net header the kernel tells us (and we tell it
  back on send) how to segment and checksum them, so they pass through intact and no
  ``ethtool -K`` (not installed) is needed;
* one FIFO per direction whose release times never go backwards, so frames are never
  reordered, not even when the delay is lowered on the fly;
* bounded queues (frames and bytes per direction): beyond the bound frames are dropped and
  counted, like a router's tail drop, instead of eating the machine's memory;
* a control socket (JSON lines on a UNIX stream socket) to read statistics and change the RTT
  while traffic flows;
* SIGTERM (and SIGINT) end it cleanly: sockets closed, control socket removed, final
  statistics written to stderr.

The queueing logic is :class:`DelayLine` (sans-IO: no sockets, the caller passes the time) so it
can be tested without namespaces; :class:`DelayBridge` is the I/O loop around it.

Run it as ``python -m spice_libvirt.lab.delaybridge --netns NS IF1 IF2 --rtt-ms N --control
PATH``; :func:`spawn` does that and waits until it answers.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from pydantic import BaseModel, Field

from spice_libvirt.errors import ConfigError, LabError
from spice_libvirt.lab import netns

_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_VNET_HDR = 15
_PACKET_OUTGOING = 4
#: virtio-net header (10 bytes) + the largest GSO frame a veth produces (64 KiB) + slack.
_RECV_BUF = 256 * 1024
_CONTROL_MAX_LINE = 4096

#: RTTs above this are certainly a typo (and would pin lots of memory in the queues).
MAX_RTT_MS = 10_000.0


class BridgeStats(BaseModel):
    """Counters the bridge reports on its control socket and at exit."""

    rtt_ms: float
    forwarded: list[int] = Field(description="frames forwarded, per direction [if1->if2, if2->if1]")
    dropped_full: list[int] = Field(description="frames dropped because the queue was full")
    send_errors: list[int] = Field(description="frames the kernel refused to send")
    queued: list[int] = Field(description="frames waiting now, per direction")
    queued_bytes: list[int]
    max_frames: int
    max_bytes: int


@dataclass
class _Direction:
    queue: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    queued_bytes: int = 0
    last_due: float = 0.0
    forwarded: int = 0
    dropped_full: int = 0
    send_errors: int = 0


class DelayLine:
    """Two bounded FIFO delay queues (sans-IO): push frames in, pop them when they are due.

    Direction 0 carries frames received on the first interface (to be sent on the second),
    direction 1 the reverse. Each frame is due ``one_way_s`` after it arrived, but never
    before the frame ahead of it, so the order on the wire is kept.
    """

    def __init__(self, rtt_ms: float, *, max_frames: int = 50_000, max_bytes: int = 64 << 20):
        if max_frames < 1 or max_bytes < _RECV_BUF:
            raise ConfigError(f"queue bounds too small: {max_frames} frames, {max_bytes} bytes")
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self._dirs = (_Direction(), _Direction())
        self.rtt_ms = 0.0
        self.set_rtt(rtt_ms)

    def set_rtt(self, rtt_ms: float) -> None:
        """Change the round-trip time; frames already queued keep their release time."""
        if not 0.0 <= rtt_ms <= MAX_RTT_MS:
            raise ConfigError(f"rtt must be between 0 and {MAX_RTT_MS:.0f} ms, not {rtt_ms}")
        self.rtt_ms = float(rtt_ms)

    @property
    def one_way_s(self) -> float:
        return self.rtt_ms / 2000.0

    def push(self, direction: int, frame: bytes, now: float) -> bool:
        """Queue a frame that arrived at ``now``; ``False`` if it was dropped (queue full)."""
        d = self._dirs[direction]
        if len(d.queue) >= self.max_frames or d.queued_bytes + len(frame) > self.max_bytes:
            d.dropped_full += 1
            return False
        due = max(now + self.one_way_s, d.last_due)
        d.last_due = due
        d.queue.append((due, frame))
        d.queued_bytes += len(frame)
        return True

    def pop_due(self, direction: int, now: float) -> list[bytes]:
        """Remove and return the frames of one direction whose time has come, oldest first."""
        d = self._dirs[direction]
        out: list[bytes] = []
        while d.queue and d.queue[0][0] <= now:
            _, frame = d.queue.popleft()
            d.queued_bytes -= len(frame)
            out.append(frame)
        return out

    def next_due(self) -> float | None:
        """The earliest release time over both directions, or ``None`` when both are empty."""
        heads = [d.queue[0][0] for d in self._dirs if d.queue]
        return min(heads) if heads else None

    def count_sent(self, direction: int, ok: bool) -> None:
        d = self._dirs[direction]
        if ok:
            d.forwarded += 1
        else:
            d.send_errors += 1

    def stats(self) -> BridgeStats:
        return BridgeStats(
            rtt_ms=self.rtt_ms,
            forwarded=[d.forwarded for d in self._dirs],
            dropped_full=[d.dropped_full for d in self._dirs],
            send_errors=[d.send_errors for d in self._dirs],
            queued=[len(d.queue) for d in self._dirs],
            queued_bytes=[d.queued_bytes for d in self._dirs],
            max_frames=self.max_frames,
            max_bytes=self.max_bytes,
        )


def _packet_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
    try:
        sock.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
        sock.bind((ifname, 0))
    except OSError as exc:
        sock.close()
        raise LabError(f"cannot open packet socket on {ifname}: {exc}") from exc
    sock.setblocking(False)
    return sock


class DelayBridge:
    """The I/O loop: two packet sockets, one control socket, one :class:`DelayLine`."""

    def __init__(self, if1: str, if2: str, line: DelayLine, control: Path) -> None:
        self.line = line
        self.control_path = control
        self._ports = (_packet_socket(if1), _packet_socket(if2))
        self._clients: dict[int, tuple[socket.socket, bytearray]] = {}
        with contextlib.suppress(FileNotFoundError):
            control.unlink()
        self._control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._control.bind(str(control))
        self._control.listen(8)
        self._control.setblocking(False)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._buf = bytearray(_RECV_BUF)
        self._epoll = select.epoll()
        for sock in (*self._ports, self._control, self._wake_r):
            self._epoll.register(sock.fileno(), select.EPOLLIN)

    def stop(self) -> None:
        """Ask the loop to end (safe from a signal handler)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def run(self) -> BridgeStats:
        """Forward frames until :meth:`stop`; return the final statistics."""
        try:
            while not self._stopping:
                self._release(time.monotonic())
                due = self.line.next_due()
                timeout = 0.5 if due is None else max(0.0, due - time.monotonic())
                for fd, _events in self._epoll.poll(timeout):
                    self._dispatch(fd)
            return self.line.stats()
        finally:
            self.close()

    def close(self) -> None:
        self._epoll.close()
        for sock, _ in self._clients.values():
            sock.close()
        self._clients.clear()
        for s in (*self._ports, self._control, self._wake_r, self._wake_w):
            s.close()
        with contextlib.suppress(FileNotFoundError):
            self.control_path.unlink()

    def _release(self, now: float) -> None:
        for direction in (0, 1):
            out = self._ports[1 - direction]
            for frame in self.line.pop_due(direction, now):
                try:
                    out.send(frame)
                    self.line.count_sent(direction, True)
                except OSError:
                    self.line.count_sent(direction, False)

    def _dispatch(self, fd: int) -> None:
        for direction, sock in enumerate(self._ports):
            if fd == sock.fileno():
                self._receive(direction, sock)
                return
        if fd == self._control.fileno():
            self._accept()
        elif fd == self._wake_r.fileno():
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(64)
        elif fd in self._clients:
            self._serve(fd)

    def _receive(self, direction: int, sock: socket.socket) -> None:
        view = memoryview(self._buf)
        for _ in range(256):  # bounded batch, so the other port and the timers get a turn
            try:
                n, addr = sock.recvfrom_into(self._buf)
            except BlockingIOError:
                return
            if addr[2] == _PACKET_OUTGOING:  # our own transmissions, seen on the way out
                continue
            frame = bytes(view[:n])
            now = time.monotonic()
            if self.line.rtt_ms <= 0.0 and self.line.next_due() is None:
                try:
                    self._ports[1 - direction].send(frame)
                    self.line.count_sent(direction, True)
                except OSError:
                    self.line.count_sent(direction, False)
            else:
                self.line.push(direction, frame, now)

    def _accept(self) -> None:
        with contextlib.suppress(BlockingIOError):
            conn, _ = self._control.accept()
            conn.setblocking(False)
            self._clients[conn.fileno()] = (conn, bytearray())
            self._epoll.register(conn.fileno(), select.EPOLLIN)

    def _serve(self, fd: int) -> None:
        conn, pending = self._clients[fd]
        try:
            data = conn.recv(_CONTROL_MAX_LINE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data or len(pending) + len(data) > _CONTROL_MAX_LINE:
            self._epoll.unregister(fd)
            del self._clients[fd]
            conn.close()
            return
        pending += data
        while b"\n" in pending:
            line, _, rest = bytes(pending).partition(b"\n")
            pending[:] = rest
            reply = self._command(line)
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(reply).encode() + b"\n")

    def _command(self, line: bytes) -> dict[str, object]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request must be a JSON object")
            cmd = request.get("cmd")
            if cmd == "set-rtt":
                self.line.set_rtt(float(request["rtt_ms"]))
            elif cmd != "stats":
                raise ValueError(f"unknown command {cmd!r}")
        except (ValueError, KeyError, TypeError, ConfigError) as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, "stats": self.line.stats().model_dump()}


# --------------------------------------------------------------------------- control client


def control(path: Path, request: dict[str, object], *, timeout: float = 5.0) -> BridgeStats:
    """Send one request to a running bridge's control socket; return its statistics."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            reply = b""
            while not reply.endswith(b"\n"):
                chunk = sock.recv(_CONTROL_MAX_LINE)
                if not chunk:
                    break
                reply += chunk
    except OSError as exc:
        raise LabError(f"delay bridge control {path}: {exc}") from exc
    try:
        answer = json.loads(reply)
    except ValueError as exc:
        raise LabError(f"delay bridge control {path}: garbled reply {reply[:80]!r}") from exc
    if not answer.get("ok"):
        raise ConfigError(f"delay bridge refused {request}: {answer.get('error')}")
    return BridgeStats.model_validate(answer["stats"])


def set_rtt(path: Path, rtt_ms: float, *, timeout: float = 5.0) -> BridgeStats:
    """Change a running bridge's round-trip time (applies to frames arriving from now on)."""
    return control(path, {"cmd": "set-rtt", "rtt_ms": rtt_ms}, timeout=timeout)


def stats(path: Path, *, timeout: float = 5.0) -> BridgeStats:
    return control(path, {"cmd": "stats"}, timeout=timeout)


def spawn(
    ns: str,
    if1: str,
    if2: str,
    *,
    rtt_ms: float,
    control_path: Path,
    log_path: Path,
    timeout: float = 10.0,
) -> netns.ProcRef:
    """Start the bridge as its own process in namespace ``ns``; return once it answers.

    The process is started in a new session so it survives the caller (``lab up`` returns
    while the lab keeps running) and is stopped later by its PID with SIGTERM.
    """
    if not 0 <= rtt_ms <= MAX_RTT_MS:
        raise ConfigError(f"client rtt must be between 0 and {MAX_RTT_MS:.0f} ms, not {rtt_ms}")
    argv = [
        sys.executable,
        "-m",
        "spice_libvirt.lab.delaybridge",
        "--netns",
        ns,
        "--rtt-ms",
        str(rtt_ms),
        "--control",
        str(control_path),
        if1,
        if2,
    ]
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            env=env,
        )
    ref = netns.ProcRef.of(proc.pid, "delay bridge")

    def ready() -> bool:
        if proc.poll() is not None:
            raise LabError(
                f"delay bridge exited with status {proc.returncode}; see {log_path}: "
                + log_path.read_text(errors="replace")[-400:].strip()
            )
        if not control_path.exists():
            return False
        try:
            stats(control_path, timeout=1.0)
        except LabError:
            return False
        return True

    try:
        netns.wait_for(ready, timeout=timeout, what="the delay bridge control socket")
    except BaseException:
        netns.terminate([ref], timeout=2.0)
        raise
    return ref


# --------------------------------------------------------------------------- entry point


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m spice_libvirt.lab.delaybridge",
        description="Forward frames between two interfaces, delaying each by RTT/2.",
    )
    parser.add_argument("if1")
    parser.add_argument("if2")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time to add")
    parser.add_argument("--control", type=Path, required=True, help="UNIX control socket path")
    parser.add_argument("--netns", help="enter this named network namespace first")
    parser.add_argument("--max-frames", type=int, default=50_000, help="queue bound per direction")
    parser.add_argument("--max-bytes", type=int, default=64 << 20, help="queue bytes per direction")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        line = DelayLine(args.rtt_ms, max_frames=args.max_frames, max_bytes=args.max_bytes)
        if args.netns:
            # enter for good: this process exists only to bridge inside that namespace
            netns.enter_for_good(args.netns)
        bridge = DelayBridge(args.if1, args.if2, line, args.control)
    except (ConfigError, LabError, OSError) as exc:
        print(f"delaybridge: error: {exc}", file=sys.stderr)
        return 2

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        bridge.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(
        f"delaybridge: pid {os.getpid()} {args.if1}<->{args.if2} rtt {line.rtt_ms} ms",
        file=sys.stderr,
        flush=True,
    )
    final = bridge.run()
    print(f"delaybridge: stopped {final.model_dump_json()}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
