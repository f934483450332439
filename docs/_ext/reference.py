"""Sources of the API reference and the figure gallery, generated from the code.

The reference has one page per public module: ``isometry`` itself, every module and subpackage
``isometry.<name>`` (found by walking the package, so a new module appears without an edit
here), every submodule of a subpackage, and the study and figure packages. Each page lists the
module's ``__all__``; a name is documented in full on the first page that lists it (a package
before its submodules) and linked from the others. The gallery has one section per figure of
``isometry.paper_figures.FIGURES``: its PNG from ``paper_figures/gallery/``, its caption (the
module docstring's first line), the rest of the docstring and its tiers.

Pure Python (no Sphinx): ``tests/test_docs.py`` checks the coverage without building the manual.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import pprint
from pathlib import Path

EXTRA = ("isometry.experiments", "isometry.paper_figures")


def public_modules() -> list[str]:
    """Every public module, a package before its submodules: ``isometry``, ``isometry.<name>``
    (and ``isometry.<package>.<name>``), then the studies and the figures with their shared
    modules (``harness``, ``core``); names starting with ``_`` and ``__main__`` are left out."""
    import isometry

    names = ["isometry"]
    for m in sorted(pkgutil.iter_modules(isometry.__path__), key=lambda m: m.name):
        if m.name.startswith("_"):
            continue
        names.append(f"isometry.{m.name}")
        if m.ispkg:
            package = importlib.import_module(f"isometry.{m.name}")
            names += [
                f"isometry.{m.name}.{s.name}"
                for s in sorted(pkgutil.iter_modules(package.__path__), key=lambda s: s.name)
                if not s.name.startswith("_")
            ]
    for package in EXTRA:
        module = importlib.import_module(package)
        names.append(package)
        names += [
            f"{package}.{s.name}"
            for s in sorted(pkgutil.iter_modules(module.__path__), key=lambda s: s.name)
            if not s.name.startswith("_")
            and hasattr(importlib.import_module(f"{package}.{s.name}"), "__all__")
        ]
    return names


def exported(module: str) -> list[str]:
    """The names a module exports: its ``__all__``."""
    return list(getattr(importlib.import_module(module), "__all__", []))


def homes(modules: list[str]) -> dict[int, str]:
    """``{id(object): "module.name"}``: the first page that lists each object (functions and
    classes only; a constant is documented on every page that lists it)."""
    home: dict[int, str] = {}
    for module in modules:
        mod = importlib.import_module(module)
        for name in exported(module):
            obj = getattr(mod, name)
            if _is_documented_once(obj):
                home.setdefault(id(obj), f"{module}.{name}")
    return home


def _is_documented_once(obj) -> bool:
    return inspect.isfunction(obj) or inspect.isclass(obj) or callable(obj)


def _directive(obj) -> str:
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "autoclass"
    if inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return "autofunction"
    return "autodata"


def _title(text: str, mark: str = "=") -> list[str]:
    return [text, mark * len(text), ""]


def module_page(module: str, home: dict[int, str], modules: list[str]) -> str:
    """The reST source of one module's page."""
    mod = importlib.import_module(module)
    names = exported(module)
    lines = _title(f"``{module}``")
    lines += [f".. automodule:: {module}", "   :no-members:"]
    parent, _, leaf = module.rpartition(".")
    if parent and getattr(importlib.import_module(parent), leaf, mod) is not mod:
        lines.append("   :no-index:")  # the package exports a function of the same name
    lines += ["", f".. currentmodule:: {module}", ""]
    children = [m for m in modules if m.rpartition(".")[0] == module]
    if children:
        lines += [".. toctree::", "   :hidden:", ""] + [f"   {m}" for m in children] + [""]
        lines += [".. rubric:: Modules", "", ".. list-table::", "   :widths: 30 70", ""]
        for m in children:
            lines += [f"   * - :mod:`~{m}`", f"     - {_summary(importlib.import_module(m))}"]
        lines.append("")
    if not names:
        return "\n".join(lines) + "\n"
    entries, bodies, constants = [], [], []
    for name in names:
        obj = getattr(mod, name)
        kind = _directive(obj)
        target = home.get(id(obj), f"{module}.{name}") if _is_documented_once(obj) else None
        if kind == "module":
            entries.append((f":mod:`~{obj.__name__}`", obj))
        elif target is not None and target != f"{module}.{name}":
            entries.append((f":obj:`~{target}`", obj))
        elif kind == "autodata":
            constants += _body(kind, name, obj)
        else:
            entries.append((f":obj:`{name}`", obj))
            bodies += _body(kind, name, obj)
    if entries:
        if children:
            lines += [".. rubric:: Names", ""]
        lines += [".. list-table::", "   :class: summary", "   :widths: 30 70", ""]
        for link, obj in entries:
            lines += [f"   * - {link}", f"     - {_summary(obj)}"]
        lines.append("")
    if constants:
        lines += [".. rubric:: Constants", "", *constants]
    return "\n".join(lines + bodies) + "\n"


def _summary(obj) -> str:
    """The first paragraph of an object's docstring, on one line."""
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split()).removesuffix(":") or " "


def _body(kind: str, name: str, obj) -> list[str]:
    if kind == "autoclass":
        inherits = any(b is not object for b in obj.__bases__)
        return [f".. autoclass:: {name}", "   :members:"] + (
            ["   :show-inheritance:", ""] if inherits else [""]
        )
    if kind == "autofunction":
        return [f".. autofunction:: {name}", ""]
    value = pprint.pformat(obj, width=1000, compact=True)
    body = [f".. py:data:: {name}"]
    if len(value) <= 300 and "object at 0x" not in value:
        body.append(f"   :value: {value}")
    return [*body, ""]


def write_reference(out: Path) -> list[str]:
    """Write one ``<module>.rst`` per public module under ``out``; return the modules."""
    modules = public_modules()
    home = homes(modules)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.rst"):
        old.unlink()
    for module in modules:
        (out / f"{module}.rst").write_text(module_page(module, home, modules))
    return modules


def index_page(modules: list[str]) -> str:
    """The reST source of the reference's front page: the top-level modules, summarized."""
    top = [m for m in modules if m.count(".") == 1]
    lines = _title("API reference")
    lines += [
        "One page per public module, generated from the code when the manual is built: each "
        "page lists the module's ``__all__``, and each name is documented in full on the first "
        "page that lists it (a package before its submodules) and linked from the others. A "
        "subpackage's page lists its modules. Equations in docstrings are text math, as "
        "``help()`` shows them; the guides write them out.",
        "",
        ".. toctree::",
        "   :hidden:",
        "",
        "   api/isometry",
        "",
        ".. list-table::",
        "   :widths: 30 70",
        "",
        "   * - :mod:`isometry`",
        f"     - {_summary(importlib.import_module('isometry'))}",
    ]
    for m in top:
        lines += [f"   * - :mod:`~{m}`", f"     - {_summary(importlib.import_module(m))}"]
    return "\n".join(lines) + "\n"


def gallery_page(gallery: Path, relative: str) -> str:
    """The reST source of the gallery: each figure's PNG, caption, details and tiers."""
    from isometry.paper_figures import FIGURES

    lines = _title("Gallery of paper figures")
    lines += [
        "The quick tier of each figure, as committed in ``paper_figures/gallery/`` and "
        "regenerated by ``isometry figures --tier quick --out paper_figures/gallery``. "
        "The caption is the first line of the figure module's docstring; the text under it "
        "is the rest of that docstring, so what the figure shows and where it differs from "
        "the paper are stated where the figure is made.",
        "",
    ]
    for number, (name, path) in enumerate(FIGURES.items(), start=1):
        module = importlib.import_module(path)
        doc = inspect.cleandoc(module.__doc__ or "")
        caption, _, details = doc.partition("\n")
        lines += _title(f"{number}. {name.replace('_', ' ').capitalize()}", "-")
        lines += [f".. figure:: {relative}/{name}.png", "   :width: 100%", f"   :alt: {name}", ""]
        lines += [f"   {caption}", ""]
        lines += [details.strip(), ""] if details.strip() else []
        lines += [f"Module ``{path}``; figure name ``{name}``.", ""]
        tiers = getattr(module, "TIERS", {})
        if tiers:
            lines += [".. list-table:: Tiers", "   :header-rows: 1", ""]
            lines += ["   * - tier", "     - parameters"]
            for tier, params in tiers.items():
                text = ", ".join(f"``{k}={v!r}``" for k, v in params.items()) or "(defaults)"
                lines += [f"   * - ``{tier}``", f"     - {text}"]
            lines.append("")
        assert (gallery / f"{name}.png").exists(), f"no gallery image for figure {name!r}"
    return "\n".join(lines) + "\n"


def setup(app):
    """Generate the sources when the build starts."""
    root = Path(app.srcdir)

    def generate(app):
        modules = write_reference(root / "generated" / "api")
        (root / "generated" / "api.rst").write_text(index_page(modules))
        gallery = root.parent / "paper_figures" / "gallery"
        page = gallery_page(gallery, "../../paper_figures/gallery")
        (root / "generated" / "gallery.rst").write_text(page)

    app.connect("builder-inited", generate)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
