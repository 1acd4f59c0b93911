"""Run by ``shoal-hooks.pth`` at every interpreter start where Shoal is
installed, so that joblib knows the ``"shoal"`` backend in processes that
never import ``shoal`` (a loky worker running ``Parallel(backend="shoal")``).

It imports nothing: once ``joblib.parallel`` is imported it adds a
``"shoal"`` entry to joblib's backends that imports Shoal only when the
backend is asked for (``import shoal`` replaces it with the class).
"""

import sys


def _backend(*args, **kwargs):
    """joblib's factory for ``"shoal"``: the backend, imported on first use."""
    from shoal._joblib import ShoalBackend

    return ShoalBackend(*args, **kwargs)


def _add(parallel) -> None:
    parallel.BACKENDS.setdefault("shoal", _backend)


class _JoblibFinder:
    """Watches for ``joblib.parallel`` and adds the backend after it loads."""

    @classmethod
    def find_spec(cls, name, path, target=None):
        if name != "joblib.parallel":
            return None
        sys.meta_path.remove(cls)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            _add(module)

        spec.loader.exec_module = exec_then_register
        return spec


if "joblib.parallel" in sys.modules:
    _add(sys.modules["joblib.parallel"])
else:
    sys.meta_path.insert(0, _JoblibFinder)
