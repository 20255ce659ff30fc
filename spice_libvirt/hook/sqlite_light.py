"""``_sqlite3`` (the C half of :mod:`sqlite3`) loaded without :mod:`functools`.

Why: ``_sqlite3`` fetches ``functools.lru_cache`` when it is imported (its per-connection
statement cache), and importing :mod:`functools` (with :mod:`collections`, a ``namedtuple``
built through ``exec``, ``reprlib``, ``operator``...) costs about 3.5 ms of CPU, a third of
a bare interpreter start, on every hook call of every guest event
(``benchmarks/bench_hook.py``). So, when nothing has imported :mod:`functools` yet (the
hook process; never the CLI, which has it long before), a stand-in module offers just
``lru_cache``, built on the same C cache the real one uses
(``_functools._lru_cache_wrapper``), for the moment ``_sqlite3`` initialises; it is removed
from ``sys.modules`` right after, so any later ``import functools`` gets the real module.
Only ``cache_info()`` differs (a plain tuple), and ``_sqlite3`` never calls it.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["sqlite3"]


def _stand_in() -> object:
    import _functools  # type: ignore[import-not-found]  # the C half of functools: no stub

    def lru_cache(maxsize: int | None = 128, typed: bool = False) -> Callable[[Any], Any]:
        def decorating(user_function: Any) -> Any:
            return _functools._lru_cache_wrapper(user_function, maxsize, typed, tuple)

        return decorating

    module = type(sys)("functools", "stand-in for _sqlite3's import (spice_libvirt.hook)")
    module.lru_cache = lru_cache  # type: ignore[attr-defined]
    return module


_STAND_IN = _stand_in() if "functools" not in sys.modules else None
if _STAND_IN is not None:
    sys.modules["functools"] = _STAND_IN  # type: ignore[assignment]
try:
    import _sqlite3 as sqlite3
finally:
    if _STAND_IN is not None and sys.modules.get("functools") is _STAND_IN:
        del sys.modules["functools"]
