"""The manual's sources cover the public API (no Sphinx needed; the build itself is .ci/run's).

The reference pages are generated from the code by ``docs/_ext/reference.py`` when the manual is
built; these tests run the same generator into a temporary folder and check that every public
module has a page and that every name of every ``__all__`` is on its module's page.
"""

import importlib
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import isometry

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def reference():
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        import reference
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    return reference


@pytest.fixture(scope="module")
def pages(reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    modules = reference.write_reference(out)
    return modules, {m: (out / f"{m}.rst").read_text() for m in modules}


def test_every_public_module_has_a_page(pages):
    modules, _ = pages
    expected = {"isometry", "isometry.experiments", "isometry.paper_figures"}
    for m in pkgutil.iter_modules(isometry.__path__):
        if not m.name.startswith("_"):
            expected.add(f"isometry.{m.name}")
    assert expected <= set(modules)


def test_every_name_of_every_all_is_on_its_page(pages):
    modules, text = pages
    for module in modules:
        mod = importlib.import_module(module)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name)
            short = getattr(obj, "__name__", name).rsplit(".", 1)[-1]
            # documented here, or linked to the page that documents the same object
            pattern = rf"(:: {re.escape(name)}\b|`~?[\w.]*\b({name}|{short})`)"
            found = re.search(pattern, text[module])
            assert found, f"{module}.{name} is not in the reference"


def test_isometry_all_is_covered(pages):
    modules, text = pages
    for name in isometry.__all__:
        if name == "__version__":
            assert ".. py:data:: __version__" in text["isometry"]
        else:
            assert f"isometry.{name}" in modules


def test_every_figure_is_in_the_gallery(reference):
    from isometry.paper_figures import FIGURES

    root = DOCS.parent
    page = reference.gallery_page(root / "paper_figures" / "gallery", "gallery")
    for name in FIGURES:
        assert f".. figure:: gallery/{name}.png" in page


def test_guides_are_in_the_manual():
    index = (DOCS / "index.md").read_text()
    for guide in sorted((DOCS / "guides").glob("*.md")):
        assert f"guides/{guide.stem}" in index, f"{guide.name} is not in the index's toctree"
