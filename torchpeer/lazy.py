"""Package exports loaded on first use (PEP 562), for the packages whose modules import torch.

The command line imports light modules of these packages (``torchpeer.lm.config_io`` for the
override syntax, ``torchpeer.hf.export`` for its parser) and must not import torch through the
package's other modules: ``torchpeer --help`` then starts in ~0.1 s instead of ~1.2 s, and a
Ctrl-C during a command's imports lands inside ``torchpeer.cli.main``.

    _EXPORTS = {"PEER": "torchpeer.layers", "peer_mix_torch": ("torchpeer.ops", "expert_mix_torch")}
    lazy_exports(__name__)      # at the end of the package's __init__.py

A value is a module (the name is the same there) or (module, name in that module).
"""

from __future__ import annotations

import importlib
import sys
import types


class LazyPackage(types.ModuleType):
    """A package whose ``_EXPORTS`` load on first attribute access.

    Some submodules share their name with what they export (``torchpeer.lm.train`` defines
    ``train``; ``torchpeer.hf.peerify`` defines ``peerify``). Importing a submodule binds it as an
    attribute of its package; eager ``from .train import train`` then rebinds the name to the
    function. Here the import system's binding of such a module is skipped instead, so the name is
    the function whichever was imported first (``sys.modules`` still holds the module).
    """

    def __getattr__(self, name: str):
        target = self.__dict__.get("_EXPORTS", {}).get(name)
        if target is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        module, attr = (target, name) if isinstance(target, str) else target
        value = getattr(importlib.import_module(module), attr)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and name in self.__dict__.get("_EXPORTS", {}):
            return  # a submodule named like one of the exports: the name stays the export
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self.__dict__.get("_EXPORTS", {})))


def lazy_exports(package: str) -> None:
    """Make the package ``package`` (its ``__name__``) load its ``_EXPORTS`` on first use."""
    sys.modules[package].__class__ = LazyPackage
