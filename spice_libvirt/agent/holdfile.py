"""Holds written down before they are applied, so that an agent that dies mid-hold undoes
them when it comes back (``agent run`` starts by :func:`pending`).

One small JSON file per held domain (by UUID) in the agent's state directory, written
atomically (temporary file + ``rename``) *before* the speed and downtime are changed and
removed only after the caller's values were restored. The directory is the agent's own
(0700); a file that does not parse is reported and left for a human, never guessed at.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from spice_libvirt.errors import AgentError, UnsafePathError
from spice_libvirt.files import PRIVATE_DIR, PRIVATE_FILE, ensure_directory, write_file


class HoldRecord(BaseModel):
    """What must be put back if the agent dies while it holds ``domain``."""

    domain: str
    uuid: str
    speed_mibs: int
    downtime_ms: int
    held_since: float  # UNIX time
    agent_pid: int


def ensure_dir(state_dir: Path) -> Path:
    """The state directory and its ``holds``, private (0700): created so, or found so
    already -- an existing directory open to others is refused, never chmodded (it may be
    someone else's: ``--state-dir /etc``)."""
    try:
        ensure_directory(state_dir, PRIVATE_DIR, private=True)
        return Path(ensure_directory(state_dir / "holds", PRIVATE_DIR, private=True))
    except UnsafePathError as exc:
        raise UnsafePathError(f"state directory: {exc}") from exc


def _path(state_dir: Path, uuid: str) -> Path:
    if not uuid or "/" in uuid or uuid.startswith("."):
        raise AgentError(f"not a domain UUID: {uuid!r}")
    return state_dir / "holds" / f"{uuid}.json"


def write(state_dir: Path, record: HoldRecord) -> None:
    """Persist ``record`` atomically; :class:`AgentError` when the disk refuses (then the
    caller must not hold: a hold nobody could undo is worse than no hold)."""
    target = _path(state_dir, record.uuid)
    try:
        ensure_dir(state_dir)
        write_file(target, record.model_dump_json(), PRIVATE_FILE, sync=True)
    except UnsafePathError as exc:
        raise AgentError(f"cannot record the hold of {record.domain}: {exc}") from exc


def remove(state_dir: Path, uuid: str) -> None:
    try:
        _path(state_dir, uuid).unlink(missing_ok=True)
    except OSError as exc:
        raise AgentError(f"cannot remove the hold record of {uuid}: {exc}") from exc


def pending(state_dir: Path) -> tuple[list[HoldRecord], list[str]]:
    """The holds a previous agent left, and the files that could not be read (problems)."""
    holds = state_dir / "holds"
    if not holds.is_dir():
        return [], []
    records: list[HoldRecord] = []
    problems: list[str] = []
    for path in sorted(holds.glob("*.json")):
        try:
            records.append(HoldRecord.model_validate(json.loads(path.read_text())))
        except (OSError, ValueError, ValidationError) as exc:
            problems.append(f"{path}: {exc}")
    return records, problems
