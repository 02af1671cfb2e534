"""Plugin registry: ``@register_plugin("name")`` and discovery.

Built-in plugins live in ``visadapt.plugins`` (the ``plugins/`` folder) and are imported on first lookup.
Third-party packages declare ``[project.entry-points."visadapt.plugins"] name = "pkg.module"``; the module
is imported when that name is asked for (or when everything is listed), and must register itself.
"""
from __future__ import annotations

import difflib
import importlib
import pkgutil
from importlib.metadata import entry_points

from visadapt.plugin import AdapterPlugin

ENTRY_POINT_GROUP = "visadapt.plugins"

_PLUGINS: dict[str, type[AdapterPlugin]] = {}


class UnknownPluginError(KeyError):
    """Raised for a plugin name nobody registered; the message lists the close matches."""

    def __str__(self) -> str:  # KeyError would print the message inside quotes
        return str(self.args[0])

_discovered = False


def register_plugin(name: str):
    """Class decorator: register an :class:`AdapterPlugin` subclass under ``name``."""

    def decorator(cls: type[AdapterPlugin]) -> type[AdapterPlugin]:
        if not (isinstance(cls, type) and issubclass(cls, AdapterPlugin)):
            raise TypeError(f"@register_plugin({name!r}) must decorate an AdapterPlugin subclass, got {cls!r}")
        existing = _PLUGINS.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"plugin name {name!r} is already taken by {existing.__module__}.{existing.__qualname__}")
        cls.name = name
        _PLUGINS[name] = cls
        return cls

    return decorator


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    import visadapt.plugins as builtin

    for info in pkgutil.iter_modules(builtin.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"visadapt.plugins.{info.name}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _PLUGINS:
            continue
        try:
            ep.load()
        except Exception as err:  # a broken third-party plugin must not hide the built-in ones
            raise ImportError(
                f"third-party visadapt plugin {ep.name!r} ({ep.value}) failed to import: {err}; "
                f"fix or uninstall the package that declares it"
            ) from err
        if ep.name not in _PLUGINS:
            raise ImportError(
                f"entry point {ep.name!r} ({ep.value}) was imported but registered no plugin under that name; "
                f"decorate its class with @visadapt.register_plugin({ep.name!r})"
            )


def get_plugin(name: str) -> type[AdapterPlugin]:
    """The plugin class registered under ``name``; an unknown name lists the close matches."""
    if name not in _PLUGINS:
        _discover()
    if name not in _PLUGINS:
        # case-insensitive first ("LoRA" -> "lora"), then spelling
        close = [known for known in _PLUGINS if known.lower() == str(name).lower()] or \
            difflib.get_close_matches(str(name).lower(), list(_PLUGINS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownPluginError(f"no visadapt plugin named {name!r}{hint} (registered: {', '.join(sorted(_PLUGINS))})")
    return _PLUGINS[name]


def list_plugins() -> list[str]:
    """Names of every registered plugin, built-in and third-party, sorted."""
    _discover()
    return sorted(_PLUGINS)
