"""Run code when an optional library is imported, without importing it.

``import shoal`` and ``Client()`` must stay fast, so integrations with Dask
and joblib register themselves when (and only if) the user imports those.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable
from typing import Any

_pending: dict[str, list[Callable[[], None]]] = {}


def when_imported(name: str, callback: Callable[[], None]) -> None:
    """Calls ``callback()`` now if module ``name`` is imported, else right
    after its import finishes."""
    if name in sys.modules:
        callback()
        return
    _pending.setdefault(name, []).append(callback)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def cancel(name: str, callback: Callable[[], None]) -> None:
    """Drops a callback that has not run yet."""
    callbacks = _pending.get(name, [])
    if callback in callbacks:
        callbacks.remove(callback)


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps the loader of a watched module to run its callbacks after it."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if not _pending.get(name):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        exec_module = spec.loader.exec_module

        def exec_then_callbacks(module: Any) -> None:
            exec_module(module)
            for callback in _pending.pop(name, []):
                try:
                    callback()
                except Exception as e:  # noqa: BLE001 - never break the user's import
                    warnings.warn(f"shoal could not hook into {name}: {e!r}", stacklevel=2)

        spec.loader.exec_module = exec_then_callbacks  # type: ignore[method-assign]
        return spec
