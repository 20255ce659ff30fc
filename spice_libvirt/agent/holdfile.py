"""Holds written down before they are applied, so that an agent that dies mid-hold undoes
them when it comes back (``agent run`` starts by :func:`pending`).

One small JSON file per held domain (by UUID) in the agent's state directory, written
atomically (temporary file + ``rename``) *before* the speed and downtime are changed and
removed only after the caller's values were restored. The directory is the agent's own
(0700, made by it or by systemd's StateDirectory=; an existing directory that is not private
is refused, never chmod-ed); a file that does not parse is reported and left for a human,
never guessed at.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from pydantic import BaseModel, ValidationError

from spice_libvirt.errors import AgentError, UnsafePathError


class HoldRecord(BaseModel):
    """What must be put back if the agent dies while it holds ``domain``."""

    domain: str
    uuid: str
    speed_mibs: int
    downtime_ms: int
    held_since: float  # UNIX time
    agent_pid: int


def _private_dir(path: Path) -> None:
    """``path`` as a directory only this user can enter: created 0700 when missing (its
    parents as needed); an existing one is used only if it is already that (this user's,
    no symlink, no access for group or others), and never chmod-ed: a directory someone
    else made or opened up is refused, not repaired."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # whatever the umask
        return
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UnsafePathError(f"state directory {path} is {what}")
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != os.geteuid() or mode & 0o077:
        raise UnsafePathError(
            f"state directory {path} exists and is not private (owner uid {st.st_uid}, mode "
            f"{mode:04o}): give a new path or make it {os.geteuid()}'s with mode 0700"
        )


def ensure_dir(state_dir: Path) -> Path:
    """The state directory and its ``holds`` directory, both private (:func:`_private_dir`);
    :class:`UnsafePathError` for one that is not."""
    _private_dir(state_dir)
    holds = state_dir / "holds"
    _private_dir(holds)
    return holds


def _path(state_dir: Path, uuid: str) -> Path:
    if not uuid or "/" in uuid or uuid.startswith("."):
        raise AgentError(f"not a domain UUID: {uuid!r}")
    return state_dir / "holds" / f"{uuid}.json"


def write(state_dir: Path, record: HoldRecord) -> None:
    """Persist ``record`` atomically; :class:`AgentError` when the disk refuses (then the
    caller must not hold: a hold nobody could undo is worse than no hold)."""
    target = _path(state_dir, record.uuid)
    tmp = target.with_suffix(".tmp")
    try:
        ensure_dir(state_dir)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(record.model_dump_json())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except (OSError, UnsafePathError) as exc:
        raise AgentError(f"cannot record the hold of {record.domain} in {target}: {exc}") from exc


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
