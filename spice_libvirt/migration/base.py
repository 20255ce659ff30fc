"""What every migration controller holds: its request, witness, reporter and run log."""

from __future__ import annotations

from typing import Generic, TypeVar

from spice_libvirt.migration.progress import NullReporter, ProgressReporter, RunLog, log_migration
from spice_libvirt.migration.report import MigrationReport
from spice_libvirt.migration.witness import MigrationWitness

R = TypeVar("R")
Rep = TypeVar("Rep", bound=MigrationReport)


class ControllerBase(Generic[R, Rep]):
    """The common state of the QEMU and the libvirt controller (one run each), and their
    one entry point :meth:`migrate` (``migrate_qemu`` and ``migrate_libvirt`` are it)."""

    @classmethod
    async def migrate(
        cls,
        request: R,
        witness: MigrationWitness | None = None,
        reporter: ProgressReporter | None = None,
    ) -> Rep:
        """Run one migration with ``request`` and return its verdict (see the subclass)."""
        return await cls(request, witness, reporter).run()

    async def run(self) -> Rep:
        raise NotImplementedError

    def __init__(
        self,
        request: R,
        witness: MigrationWitness | None = None,
        reporter: ProgressReporter | None = None,
    ) -> None:
        self.req = request
        self.witness = witness
        self.reporter: ProgressReporter = reporter or NullReporter()
        # the one line per migration for syslog is the run log's only way out
        self.log = RunLog(self.reporter, sink=log_migration)

    def note(self, text: str) -> None:
        self.log.note(text)


__all__ = ["ControllerBase"]
