"""partc: a compiler for distributed DNN inference across device, edge and cloud.

The Python API mirrors the command line, one function per command:

- ``partc.inspect(model, input_shapes)`` is ``partc inspect``;
- ``partc.profile(gm, ...)`` is ``partc profile`` (trace first with ``partc.trace_model``);
- ``partc.plan(model, input_shapes, cluster)`` is ``partc plan``;
- ``partc.compile(model, input_shapes, cluster, output)`` is ``partc compile``;
- ``partc.load(build)`` loads a build that ``partc run`` runs.

Attributes are imported on first use, so that ``import partc`` (and a runtime worker that
never traces a model) does not pay for importing torch. Every submodule is reachable the
same way (``partc.planning``, ``partc.runtime``) except ``partc.plan`` and ``partc.profile``,
which are the functions above: import those modules by name (``from partc.plan import Plan``).
"""

import importlib
import importlib.util
import sys
import types

from partc.version import __version__ as __version__

_API = {
    "inspect": ("partc.report", "inspect"),
    "trace_model": ("partc.report", "trace_model"),
    "load_model": ("partc.trace", "load_model"),
    "profile": ("partc.profile", "profile_model"),
    "plan": ("partc.planning", "plan_model"),
    "compile": ("partc.build", "compile_model"),
    "load": ("partc.runtime.local", "load"),
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        module, attr = _API[name]
        return getattr(importlib.import_module(module), attr)
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'partc' has no attribute {name!r}")


class _Package(types.ModuleType):
    """The ``partc`` package: importing its module ``partc.plan`` or ``partc.profile`` (which the
    import system then sets as the package's attribute) leaves ``partc.plan`` the function."""

    def __setattr__(self, name: str, value: object) -> None:
        if not (name in _API and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
