"""Sphinx configuration of the isometry manual.

Build: ``python -m sphinx -W --keep-going -b html docs docs/_build/html`` (the README's
command). Nothing is fetched at build time: MathJax is served from the ``sphinx-mathjax-offline``
package and there is no intersphinx mapping.
"""

import inspect
import sys
from pathlib import Path

from sphinx.ext.napoleon import docstring as napoleon_docstring
from sphinx.util import logging

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import isometry

project = "isometry"
author = "the isometry authors"
copyright = "the isometry authors"
release = version = isometry.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 copied into _static: equations render offline
    "myst_parser",
    "reference",  # docs/_ext/reference.py: the API pages and the gallery, from the code
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
templates_path = []

# Warnings are errors (-W); every cross-reference must resolve.
nitpicky = True
nitpick_ignore_regex = [
    # names of other libraries (no intersphinx: nothing is fetched) and typing helpers
    (
        r"py:.*",
        r"(jax|jnp|np|numpy|flax|nnx|optax|orbax|matplotlib|typing|collections|"
        r"concurrent|pathlib|os|io|dataclasses|enum|abc|types|functools|builtins)(\..*)?",
    ),
    (
        r"py:.*",
        r"(Array|ArrayLike|Path|Callable|Sequence|Mapping|Iterable|Iterator|Any|"
        r"Figure|Axes|Module|PyTree|DTypeLike|Literal|Optional|Union|NamedTuple|Self|"
        r"Key|PRNGKey|GraphDef|State|Rngs|GradientTransformation|Protocol|TypeAlias)",
    ),
]

myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "none"
autodoc_default_options = {"member-order": "bysource"}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = False
napoleon_attr_annotations = False

html_theme = "furo"
html_title = f"isometry {release}"
html_static_path = []
highlight_language = "text"  # docstrings' literal blocks are text math, not Python
pygments_style = "friendly"
pygments_dark_style = "monokai"

_logger = logging.getLogger("isometry.docs")


def _prose(self):
    """Property docstrings here are prose (``"The mass at 0: ..."``), never ``"type: text"``."""
    return self._consume_to_end()


napoleon_docstring.GoogleDocstring._parse_attribute_docstring = _prose


def _missing_docstring(app, what, name, obj, options, lines):
    """A public function, class or method without a docstring is a warning (an error under -W)."""
    if what in ("function", "class", "method") and not inspect.getdoc(obj):
        _logger.warning(f"public {what} {name} has no docstring", type="isometry", subtype="doc")


def _lookup(target: str, module: str | None, cls: str | None):
    """The object a Python reference names, searched from its module outwards."""
    import importlib

    scopes = []
    if module:
        parts = module.split(".")
        scopes += [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
        if cls:
            scopes.insert(0, f"{module}.{cls}")
    scopes.append("")
    for scope in scopes:
        path = f"{scope}.{target}" if scope else target
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                break
            return obj
    return None


def _resolve_alias(app, env, node, contnode):
    """A name used where it was imported resolves to the page that documents the object.

    A docstring says :func:`train` in ``isometry.training.loop``; the object is documented as
    ``isometry.training.train`` (its package's page). Found by the object's identity, so every
    alias of a documented function or class links to its one description.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    obj = _lookup(target, node.get("py:module"), node.get("py:class"))
    home = _HOMES.get(id(obj))
    if obj is not None and inspect.ismodule(obj):
        home = obj.__name__
    elif obj is not None and home is None and "." in target:
        # a method or attribute of a documented class: Class.method
        owner = _lookup(target.rsplit(".", 1)[0], node.get("py:module"), node.get("py:class"))
        if owner is not None and id(owner) in _HOMES:
            home = f"{_HOMES[id(owner)]}.{target.rsplit('.', 1)[1]}"
    if home is None:
        # a name documented on exactly one page (a constant, or a name not imported here)
        leaf = target.rsplit(".", 1)[-1]
        found = [n for n, o in _NAMES.get(leaf, []) if obj is None or o is obj]
        home = found[0] if len(found) == 1 else None
    if home is None or home == target:
        return None
    py = env.get_domain("py")
    return py.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], home, node, contnode)


_HOMES: dict[int, str] = {}
_NAMES: dict[str, list] = {}


def _homes(app):
    import importlib

    import reference

    modules = reference.public_modules()
    _HOMES.update(reference.homes(modules))
    for module in modules:
        mod = importlib.import_module(module)
        for name in reference.exported(module):
            obj = getattr(mod, name)
            full = _HOMES.get(id(obj), f"{module}.{name}")
            if (full, obj) not in [(n, o) for n, o in _NAMES.get(name, [])]:
                if all(o is not obj for _, o in _NAMES.get(name, [])):
                    _NAMES.setdefault(name, []).append((full, obj))


def _skip_fields(app, what, name, obj, skip, options):
    """Fields are described once, by the class's Attributes section."""
    if (getattr(obj, "__doc__", None) or "").startswith("Alias for field number"):
        return True
    if inspect.isfunction(obj) and "." not in obj.__qualname__:
        return True  # a field holding a module-level function (a default), not a method
    return None


def setup(app):
    app.connect("autodoc-process-docstring", _missing_docstring)
    app.connect("builder-inited", _homes)
    app.connect("missing-reference", _resolve_alias)
    app.connect("autodoc-skip-member", _skip_fields)
