"""The benchmark scripts stay runnable both ways (``-m`` and as a file) with one prelude.

A trial run (``--no-save``) must leave the committed results alone.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: every benchmark and plot script (found, not listed: a new one cannot be forgotten)
SCRIPTS = sorted(
    p.stem for pattern in ("bench_*.py", "plot_*.py") for p in (ROOT / "benchmarks").glob(pattern)
)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("mode", ["module", "file"])
# a script another one imports (bench_libvirt_rtt) is in sys.modules when run as __main__
@pytest.mark.filterwarnings("ignore:.*found in sys.modules after import:RuntimeWarning")
def test_help_both_ways(
    script: str, mode: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """As a file in a fresh interpreter (its own prelude puts the repository on sys.path);
    as a module in this one (``python -m`` semantics, the import costs paid once)."""
    if mode == "file":
        done = _run(f"benchmarks/{script}.py", "--help")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("usage:")
        return
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{script}.py", "--help"])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module(f"benchmarks.{script}", run_name="__main__", alter_sys=True)
    assert exited.value.code in (0, None)
    assert capsys.readouterr().out.startswith("usage:")


def test_every_script_uses_the_one_prelude() -> None:
    prelude = 'if __package__ in (None, ""):  # run as a file: benchutil puts the repository'
    for script in SCRIPTS:
        text = (ROOT / "benchmarks" / f"{script}.py").read_text()
        assert prelude in text, script
        assert "sys.path.insert" not in text, script


def test_quick_codec_run_leaves_the_results_alone() -> None:
    committed = ROOT / "benchmarks" / "results" / "codec.json"
    before = committed.read_bytes() if committed.exists() else None
    done = _run(
        "benchmarks/bench_codec.py", "--rounds", "1", "--messages", "500", "--json", "--no-save"
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["benchmark"] == "codec"
    assert (committed.read_bytes() if committed.exists() else None) == before
