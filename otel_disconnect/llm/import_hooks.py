"""Patch a library when it is imported, never import it ourselves.

``PatchOnImport(names, patch, where).enable()`` patches the modules of ``names`` already
imported and, through wrapt's post-import hooks (registered once), each one the app imports
later; ``disable()`` stops patching new imports (undoing patches is the caller's). A library an
app never imports costs it nothing, and with the ``opentelemetry-instrument`` launcher this runs
before the app imports anything. A patch that fails is an internal error counted under
``where``: the library runs unpatched.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Callable, Iterable

import wrapt

from ..failsafe import internal_error


class PatchOnImport:
    def __init__(
        self, names: Iterable[str], patch: Callable[[types.ModuleType], None], where: str
    ) -> None:
        self.names = tuple(names)
        self.patch = patch
        self.where = where
        # Reentrant: a post-import hook may run inside enable(), on the same thread.
        self.lock = threading.RLock()
        self.enabled = False
        self._registered = False

    def imported(self) -> list[types.ModuleType]:
        return [mod for name in self.names if (mod := sys.modules.get(name)) is not None]

    def enable(self, names: Iterable[str] | None = None) -> None:
        """Patch now what is imported, and later what gets imported (only ``names``, of those,
        get a hook: the ones installed)."""
        with self.lock:
            self.enabled = True
            if not self._registered:
                self._registered = True
                for name in self.names if names is None else names:
                    wrapt.register_post_import_hook(self._on_import, name)
            for mod in self.imported():
                self.patch(mod)

    def disable(self) -> None:
        with self.lock:
            self.enabled = False

    def _on_import(self, mod: types.ModuleType) -> None:
        try:
            with self.lock:
                if self.enabled:
                    self.patch(mod)
        except Exception:
            internal_error(self.where)
