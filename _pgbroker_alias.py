"""Make ``pgbroker://`` URLs resolve in kombu without an import in user code.

kombu finds transports only through its ``TRANSPORT_ALIASES`` dict; there is no
entry-point group for them. The wheel ships ``pgbroker_alias.pth``, which Python
runs at start-up and which imports this module. It must stay cheap: it imports
nothing but the standard library and waits, through a meta-path finder, for
``kombu.transport`` to be imported by someone else, then adds our alias to it.
A process that never uses kombu pays one dictionary lookup per import.

``import pgbroker`` registers the alias as well, for interpreters started with
``-S`` (no site-packages processing) or installs that skip ``.pth`` files.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

ALIASES = {"pgbroker": "pgbroker.transport:Transport"}
_TARGET = "kombu.transport"


def register(module) -> None:
    """Add pgbroker's URL schemes to ``kombu.transport.TRANSPORT_ALIASES``."""
    for scheme, path in ALIASES.items():
        module.TRANSPORT_ALIASES.setdefault(scheme, path)


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped):
        self._wrapped = wrapped

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module):
        self._wrapped.exec_module(module)
        register(module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one-shot: let the normal finders do the work
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader)
        return spec


def install() -> None:
    if _TARGET in sys.modules:
        register(sys.modules[_TARGET])
    elif not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


install()
