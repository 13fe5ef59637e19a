"""A Griffe extension for ``make docs``: the docstrings' Sphinx roles become checked cross-references.

fedmeta's docstrings name other objects with Sphinx roles (``:func:`adapt```, ``:class:`fedmeta.settings.Setting```,
``:meth:`step```). mkdocstrings does not read roles, so this extension rewrites each one, when the package is
loaded, into an mkdocstrings cross-reference ``[`adapt`][fedmeta.meta.adapt]``: the name resolved from the
docstring's own scope (its class, its module, what the module imports), the way Python would find it, or else
the one object of the package with that name (as Sphinx finds a bare name), an imported name followed to the
object it names. With
``mkdocs build --strict`` a reference to a fedmeta object that the API reference does not document (a renamed or
deleted function) fails the build. Names outside fedmeta (``torch.func.vmap``, Flower's classes) become code, as
the build is offline and has no other project's inventory.
"""

from __future__ import annotations

import re

import griffe

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc|const|py:\w+):`(?P<tilde>~?)\.?(?P<name>[\w.]+)(?:\(\))?`")
PACKAGE = "fedmeta"


def _in_scope(obj: griffe.Object, name: str) -> str | None:
    """The full path ``name`` denotes in ``obj``'s scope (its own members, its parents'), or None."""
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        return name
    head, _, rest = name.partition(".")
    scope = obj
    while scope is not None:
        try:
            full = scope.resolve(head)
        except griffe.NameResolutionError:
            scope = scope.parent
            continue
        return f"{full}.{rest}" if rest else full
    return None


def _target(pkg: griffe.Module, path: str) -> str:
    """``path`` with every imported name on it followed to the object it names (or ``path``, if outside)."""
    if not path.startswith(PACKAGE + "."):
        return path
    try:
        obj = pkg[path[len(PACKAGE) + 1:]]
        return obj.final_target.path if obj.is_alias else obj.path
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return path


def _resolve(obj: griffe.Object, name: str, pkg: griffe.Module, by_name: dict[str, list[str]]) -> str | None:
    full = _in_scope(obj, name)
    if full is None:
        found = by_name.get(name, []) if "." not in name else [p for p in by_name.get(name.rsplit(".", 1)[1], [])
                                                                 if p.endswith("." + name)]
        full = found[0] if len(found) == 1 else None
    return None if full is None else _target(pkg, full)


def _link(obj: griffe.Object, match: re.Match, pkg: griffe.Module, by_name: dict[str, list[str]]) -> str:
    name = match["name"]
    shown = name.rsplit(".", 1)[-1] if match["tilde"] else name
    full = _resolve(obj, name, pkg, by_name)
    if full is None:
        return f"[`{shown}`][{name}]"  # unresolvable: autorefs reports it, and --strict fails
    if not (full == PACKAGE or full.startswith(PACKAGE + ".")):
        return f"`{shown}`"  # another project's object: no inventory offline
    return f"[`{shown}`][{full}]"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the loaded package into cross-references."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        if pkg.path != PACKAGE:
            return
        objects = list(_walk(pkg))
        by_name: dict[str, list[str]] = {}
        for obj in objects:
            by_name.setdefault(obj.name, []).append(obj.path)
        for obj in objects:
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(lambda m: _link(obj, m, pkg, by_name), obj.docstring.value)


def _walk(obj: griffe.Object):
    """``obj`` and every object defined in it (not the names it imports)."""
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)
