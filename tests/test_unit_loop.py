"""``pytest -m unit`` spreads over two workers; nothing else does (:func:`tests.rigs.unit.spread`)."""

from __future__ import annotations

import types
from typing import Any

import pytest

from tests.rigs import unit


class _Plugins:
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def hasplugin(self, name: str) -> bool:
        return name in self.names


def _config(markexpr: str, numprocesses: int | None = None, **extra: Any) -> Any:
    option = types.SimpleNamespace(
        markexpr=markexpr, numprocesses=numprocesses, tx=[], dist="no", collectonly=False
    )
    config = types.SimpleNamespace(option=option, pluginmanager=_Plugins({"xdist"}))
    for key, value in extra.items():
        setattr(config, key, value)
    return config


@pytest.fixture(autouse=True)
def _two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 2)


def test_the_unit_selection_runs_on_two_workers() -> None:
    config = _config(" unit ")
    unit.spread(config)
    assert (config.option.tx, config.option.dist) == (["popen", "popen"], "load")


@pytest.mark.parametrize(
    "config",
    [
        _config(""),  # the whole suite: labs and namespaces are not shared between workers
        _config("not vagrant"),
        _config("unit and not slow"),
        _config("unit", numprocesses=0),  # the contributor's own -n wins
        _config("unit", workerinput={}),  # a worker never spreads again
    ],
    ids=["all", "not-vagrant", "other-expression", "n-given", "worker"],
)
def test_anything_else_runs_as_asked(config: Any) -> None:
    unit.spread(config)
    assert (config.option.tx, config.option.dist) == ([], "no")


def test_without_xdist_or_a_second_core_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config("unit")
    config.pluginmanager = _Plugins(set())
    unit.spread(config)
    assert config.option.tx == []
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    config = _config("unit")
    unit.spread(config)
    assert config.option.tx == []
