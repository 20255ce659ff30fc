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
* random loss and jitter per direction (``netem loss P%`` and ``delay D J``), with a
  seedable RNG so a run can be repeated. Jitter keeps the FIFO: a frame is never released
  before the one ahead of it, so every flow (every frame of a direction, in fact) keeps its
  order. That is a queue's behaviour, not netem's (netem reorders under jitter): TCP in the
  lab then sees delay variation and loss, never spurious reordering that would mix a third
  impairment into the figures. The price: frames closer together than the jitter spread
  leave together at the later one's time, so on a busy link the delay distribution is
  skewed upwards (exactly what a congested queue does);
* bounded queues (frames and bytes per direction): beyond the bound frames are dropped and
  counted, like a router's tail drop, instead of eating the machine's memory;
* a control socket (JSON lines on a UNIX stream socket) to read statistics and change the RTT,
  loss, jitter and seed while traffic flows;
* SIGTERM (and SIGINT) end it cleanly: sockets closed, control socket removed, final
  statistics written to stderr.

The queueing logic is :class:`~spice_libvirt_lab.delayline.DelayLine` (sans-IO, in its own
module: no sockets, the caller passes the time) so it can be tested without namespaces;
:class:`DelayBridge` is the I/O loop around it.

Run it as ``python -m spice_libvirt_lab.delaybridge --netns NS IF1 IF2 --rtt-ms N --control
PATH``; :func:`spawn` does that and waits until it answers.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from types import FrameType

from spice_libvirt.errors import ConfigError, LabError
from spice_libvirt_lab import netns
from spice_libvirt_lab.delayline import (
    MAX_JITTER_MS,
    MAX_RTT_MS,
    BridgeStats,
    DelayLine,
    JitterDist,
    PerDirection,
    check_pair,
)
from spice_libvirt_lab.delayline import (
    RECV_BUF as _RECV_BUF,
)

_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_VNET_HDR = 15
_PACKET_OUTGOING = 4
_CONTROL_MAX_LINE = 4096


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
            if self.line.rtt_ms <= 0.0 and not self.line.impaired and self.line.next_due() is None:
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
            elif cmd == "set-impairment":
                self.line.set_impairment(
                    loss_pct=request.get("loss_pct"),
                    jitter_ms=request.get("jitter_ms"),
                    jitter_dist=request.get("jitter_dist"),
                    direction=request.get("direction"),
                )
            elif cmd == "seed":
                seed = request.get("seed")
                if seed is not None and not isinstance(seed, int):
                    raise ValueError(f"seed must be an integer or null, not {seed!r}")
                self.line.reseed(seed)
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


def set_impairment(
    path: Path,
    *,
    loss_pct: PerDirection | None = None,
    jitter_ms: PerDirection | None = None,
    jitter_dist: JitterDist | None = None,
    direction: int | None = None,
    timeout: float = 5.0,
) -> BridgeStats:
    """Change a running bridge's loss and jitter (``None``: keep), both directions or one
    (0: if1->if2, 1: if2->if1); applies to frames arriving from now on."""
    request: dict[str, object] = {"cmd": "set-impairment", "direction": direction}
    if loss_pct is not None:
        request["loss_pct"] = loss_pct if isinstance(loss_pct, int | float) else list(loss_pct)
    if jitter_ms is not None:
        request["jitter_ms"] = jitter_ms if isinstance(jitter_ms, int | float) else list(jitter_ms)
    if jitter_dist is not None:
        request["jitter_dist"] = jitter_dist
    return control(path, request, timeout=timeout)


def reseed(path: Path, seed: int | None, *, timeout: float = 5.0) -> BridgeStats:
    """Restart a running bridge's RNG with ``seed`` (reproducible losses and delays)."""
    return control(path, {"cmd": "seed", "seed": seed}, timeout=timeout)


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
    loss_pct: PerDirection = 0.0,
    jitter_ms: PerDirection = 0.0,
    jitter_dist: JitterDist = "uniform",
    seed: int | None = None,
) -> netns.ProcRef:
    """Start the bridge as its own process in namespace ``ns``; return once it answers.

    The process is started in a new session so it survives the caller (``lab up`` returns
    while the lab keeps running) and is stopped later by its PID with SIGTERM.
    """
    if not 0 <= rtt_ms <= MAX_RTT_MS:
        raise ConfigError(f"client rtt must be between 0 and {MAX_RTT_MS:.0f} ms, not {rtt_ms}")
    loss = check_pair(loss_pct, "loss_pct", 100.0)
    jitter = check_pair(jitter_ms, "jitter_ms", MAX_JITTER_MS)
    argv = [
        sys.executable,
        "-m",
        "spice_libvirt_lab.delaybridge",
        "--netns",
        ns,
        "--rtt-ms",
        str(rtt_ms),
        "--control",
        str(control_path),
        "--loss-pct",
        f"{loss[0]!r},{loss[1]!r}",
        "--jitter-ms",
        f"{jitter[0]!r},{jitter[1]!r}",
        "--jitter-dist",
        jitter_dist,
        *(["--seed", str(seed)] if seed is not None else []),
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


def _per_direction(text: str) -> tuple[float, ...]:
    """``P`` (both directions) or ``P1,P2`` (if1->if2, if2->if1)."""
    return tuple(float(part) for part in text.split(","))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m spice_libvirt_lab.delaybridge",
        description="Forward frames between two interfaces, delaying each by RTT/2.",
    )
    parser.add_argument("if1")
    parser.add_argument("if2")
    parser.add_argument("--rtt-ms", type=float, default=0.0, help="round-trip time to add")
    parser.add_argument("--control", type=Path, required=True, help="UNIX control socket path")
    parser.add_argument("--netns", help="enter this named network namespace first")
    parser.add_argument("--max-frames", type=int, default=50_000, help="queue bound per direction")
    parser.add_argument("--max-bytes", type=int, default=64 << 20, help="queue bytes per direction")
    parser.add_argument(
        "--loss-pct", type=_per_direction, default=(0.0,), help="random loss, %% (P or P1,P2)"
    )
    parser.add_argument(
        "--jitter-ms", type=_per_direction, default=(0.0,), help="one-way jitter (J or J1,J2)"
    )
    parser.add_argument("--jitter-dist", choices=["uniform", "normal"], default="uniform")
    parser.add_argument("--seed", type=int, default=None, help="seed the loss/jitter RNG")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        line = DelayLine(
            args.rtt_ms,
            max_frames=args.max_frames,
            max_bytes=args.max_bytes,
            loss_pct=args.loss_pct[0] if len(args.loss_pct) == 1 else args.loss_pct,
            jitter_ms=args.jitter_ms[0] if len(args.jitter_ms) == 1 else args.jitter_ms,
            jitter_dist=args.jitter_dist,
            seed=args.seed,
        )
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
        f"delaybridge: pid {os.getpid()} {args.if1}<->{args.if2} rtt {line.rtt_ms} ms, "
        f"loss {args.loss_pct} %, jitter {args.jitter_ms} ms {line.jitter_dist}, "
        f"seed {line.seed}",
        file=sys.stderr,
        flush=True,
    )
    final = bridge.run()
    print(f"delaybridge: stopped {final.model_dump_json()}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "MAX_JITTER_MS",
    "MAX_RTT_MS",
    "BridgeStats",
    "DelayBridge",
    "DelayLine",
    "JitterDist",
    "PerDirection",
    "control",
    "main",
    "reseed",
    "set_impairment",
    "set_rtt",
    "spawn",
    "stats",
]
