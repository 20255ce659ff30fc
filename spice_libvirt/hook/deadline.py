"""The time budget of one hook invocation: a soft alarm and a hard watchdog.

Why two: libvirtd (or VDSM) blocks the guest operation while a hook runs, so the hook must
end within its budget whatever it is doing. The *soft* deadline (``SIGALRM`` raising
:class:`HookDeadlineError` in the main thread) lets the hook say why and pick its exit
status; it cannot fire while the interpreter is stuck in C code (a blocked ``read`` whose
signal is masked, a hung file system). The *hard* deadline is a daemon thread that calls
``os._exit`` a little later, and covers exactly that case.

Why it is armed before anything else, the configuration included: the budget is what the
configuration says (``hook_timeout_s``), but reading the configuration can itself hang (a
file on a dead NFS mount). So the budget starts at the project's ceiling,
:data:`~spice_libvirt.config.MAX_HOOK_TIMEOUT_S`, with the fail-open exit status, and
:meth:`Deadline.retarget` tightens it once the configuration is known.

Why it is disarmed before the output is written: a rewrite hook's stdout *replaces* the
domain XML. A deadline firing in the middle of that write would hand libvirt half a
document with exit status 0. Once the result is computed, writing it takes microseconds;
the callers leave the ``with`` block (which disarms both) and then write the whole document
at once.
"""

from __future__ import annotations

# The C modules behind ``signal`` and ``threading``: the Python wrappers import ``enum`` and
# more, a measurable share of a hook's start-up (``benchmarks/bench_hook.py``), for
# nothing this module needs.
import _signal  # type: ignore[import-not-found]  # no stubs; used as signal's C half
import _thread
import os
import time

from spice_libvirt.errors import HookError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import FrameType, TracebackType

#: Time kept back between the soft deadline and the hard one, for reporting and journaling.
REPORT_MARGIN_S = 0.3
#: Longest sleep of the hard watchdog before it looks at the budget again (a retarget
#: that shortens the budget takes effect within this).
WATCH_SLICE_S = 0.05


class HookDeadlineError(HookError):
    """The invocation ran into its soft deadline."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise HookDeadlineError("deadline exceeded")


class Deadline:
    """``with Deadline(...) as dl:`` arms both deadlines; leaving the block disarms them.

    ``started`` is the ``time.monotonic()`` the budget counts from (the console scripts pass
    their module's load time, so interpreter start-up is counted too). The soft alarm is
    only armed in the main thread (signals are delivered there); the hard watchdog only
    when ``hard`` is true, because ``os._exit`` would end a test runner too.
    """

    def __init__(
        self,
        started: float,
        budget_s: float,
        *,
        prog: str,
        exit_code: int = 0,
        hard: bool = False,
        margin_s: float = REPORT_MARGIN_S,
    ) -> None:
        self.started = started
        self.budget_s = budget_s
        self.exit_code = exit_code
        self._prog = prog
        self._hard = hard
        self._margin_s = margin_s
        #: held while armed; the watchdog ends when it can take it
        self._armed = _thread.allocate_lock()
        self._soft = False
        self._previous: object = None

    # ------------------------------------------------------------------ arithmetic

    def remaining(self) -> float:
        """Seconds left of the whole budget (negative once it is spent)."""
        return self.started + self.budget_s - time.monotonic()

    def _soft_in(self) -> float:
        return max(self.remaining() - self._margin_s, 0.01)

    # ------------------------------------------------------------------ arming

    def __enter__(self) -> Deadline:
        self._armed.acquire()
        try:
            self._previous = _signal.signal(_signal.SIGALRM, _on_alarm)
        except ValueError:
            pass  # not the main thread: signals are delivered there only, no soft deadline
        else:
            self._soft = True
            _signal.setitimer(_signal.ITIMER_REAL, self._soft_in())
        if self._hard:
            _thread.start_new_thread(self._watch, ())
        return self

    def retarget(self, budget_s: float, exit_code: int) -> None:
        """Replace the budget (still counted from ``started``) and the hard exit status.

        Raises :class:`HookDeadlineError` at once when the new soft deadline has already
        passed (a budget shorter than start-up): better than racing a 10 ms alarm.
        """
        self.budget_s = budget_s
        self.exit_code = exit_code
        if self._soft:
            if self.remaining() - self._margin_s <= 0:
                raise HookDeadlineError("the budget was spent before the hook could start")
            _signal.setitimer(_signal.ITIMER_REAL, self._soft_in())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.disarm()

    def disarm(self) -> None:
        """Stop both deadlines; idempotent. Call before writing anything libvirt consumes."""
        try:
            if self._soft:
                _signal.setitimer(_signal.ITIMER_REAL, 0)
        finally:
            if self._soft:
                self._soft = False
                _signal.signal(_signal.SIGALRM, self._previous)
            if self._armed.locked():
                self._armed.release()

    # ------------------------------------------------------------------ the hard watchdog

    def _watch(self) -> None:
        while True:
            left = self.remaining()
            if left <= 0:
                try:  # noqa: SIM105 - contextlib would be one more import at start-up
                    os.write(2, f"{self._prog}: hard deadline exceeded, exiting\n".encode())
                except OSError:
                    pass
                os._exit(self.exit_code)
            if self._armed.acquire(timeout=min(left, WATCH_SLICE_S)):
                self._armed.release()
                return
