"""The installed package: one top-level name, ``isometry``, holding every subpackage.

A wheel is built from a copy of the sources (so no stale build folder of the
checkout leaks into it), its file list is read, and it is unpacked alone
(``pip install --no-deps --target``) and run from a directory outside the
checkout: ``isometry figures --list`` and ``isometry run --list`` must work
from the installed copy. Building needs pip to reach the build requirements
(``setuptools``) like any install does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "isometry", "experiments", "paper_figures")


def _mapped_packages() -> dict[str, Path]:
    """``{package: source folder}`` of every folder with an ``__init__.py``, as installed."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    out = {}
    for package, folder in cfg["package-dir"].items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            rel = init.parent.relative_to(ROOT / folder).parts
            out[".".join((package, *rel))] = init.parent
    return out


def test_pyproject_lists_every_package_under_isometry():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(cfg["packages"]) == set(_mapped_packages())
    assert all(p == "isometry" or p.startswith("isometry.") for p in cfg["packages"])


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy2
        kwargs = (
            {"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}
        )
        copy(ROOT / name, src / name, **kwargs)
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(src), "-w", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("isometry-*.whl")
    return path


def test_wheel_holds_only_the_isometry_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"isometry"}
    folders = {n.rpartition("/")[0].replace("/", ".") for n in names if n.endswith(".py")}
    assert folders == set(_mapped_packages())
    for package, folder in _mapped_packages().items():
        want = {p.name for p in folder.glob("*.py")}
        have = {
            n.rpartition("/")[2] for n in names if n.rpartition("/")[0] == package.replace(".", "/")
        }
        assert want == have, package


def test_installed_commands_run_outside_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site)]
    done = subprocess.run([*cmd, str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = "import isometry, sys; print(isometry.__file__)"
    for args, expect in [
        (["figures", "--list"], "phase_diagram: "),
        (["run", "--list"], "spectra"),
    ]:
        code = f"{where}; from isometry.cli import main; sys.exit(main({args!r}))"
        run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.startswith(str(site)) and expect in run.stdout
