"""Install truth: a missing optional piece is one message naming it and its install command;
an installed package that fails to import is a real error and is never swallowed."""

import importlib
import sys

import pytest

from attnc.core.errors import SpecError
from attnc.runtime import tritonenv as triton_support


def test_missing_numpy_names_the_package_and_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "numpy", None)  # makes `import numpy` raise ModuleNotFoundError
    with pytest.raises(SpecError) as info:
        triton_support.require_triton(interpret=True)
    text = str(info.value)
    assert "'numpy'" in text and "pip install 'numpy<2.4'" in text and "backend" in text
    triton_support.require_triton(interpret=False)  # native kernels do not need numpy


def test_missing_triton_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(SpecError, match="(?s)'triton' package.*pip install triton"):
        triton_support.require_triton(interpret=False)


def test_a_broken_installed_package_is_not_reported_as_missing(monkeypatch):
    real = importlib.import_module

    def broken(name, *args):
        if name == "numpy":  # numpy is installed, but something it imports is missing
            raise ModuleNotFoundError("No module named 'numpy_core_helper'", name="numpy_core_helper")
        return real(name, *args)

    monkeypatch.setattr(triton_support.importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError, match="numpy_core_helper"):
        triton_support.require_triton(interpret=True)


def test_the_triton_backend_checks_before_loading_kernels(monkeypatch, tmp_path):
    from attnc.runtime.backends.triton import runner as triton_backend

    path = tmp_path / "k.py"
    path.write_text("X = 1\n")
    monkeypatch.setitem(sys.modules, "numpy", None)
    with pytest.raises(SpecError, match="numpy"):
        triton_backend.load_kernels(str(path), interpret=True)


def test_numpy_is_a_declared_dependency():
    from importlib.metadata import requires

    deps = [r.split(";")[0].replace(" ", "") for r in requires("attnc")]
    assert any(d.startswith("numpy") and "<2.4" in d for d in deps), deps


def test_every_package_folder_is_listed_for_the_wheel():
    """pyproject lists the packages explicitly (the repository root is ``attnc``): a folder with an
    ``__init__.py`` missing from the list is left out of a regular (non-editable) install."""
    import pathlib

    import tomllib

    root = pathlib.Path(__file__).resolve().parents[2]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    skip = {"tests", "benchmarks", "docs", "build"}
    found = {"attnc." + ".".join(p.parent.relative_to(root).parts) if p.parent != root else "attnc"
             for p in root.rglob("__init__.py")
             if not (set(p.relative_to(root).parts) & skip or any(s.startswith(".") for s in p.parts))}
    assert found - listed == set(), f"folders missing from [tool.setuptools] packages: {sorted(found - listed)}"


def test_the_tests_live_in_folders_by_area_each_on_the_pythonpath():
    """No test module sits at the top of ``tests/`` (only shared helpers); every folder holding tests is on
    pytest's ``pythonpath`` (tests import helpers from each other by module name, across folders)."""
    import pathlib

    import tomllib

    root = pathlib.Path(__file__).resolve().parents[2]
    listed = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["pythonpath"]
    assert sorted((root / "tests").glob("test_*.py")) == []
    folders = {p.parent.relative_to(root).as_posix() for p in (root / "tests").rglob("test_*.py")}
    assert folders <= set(listed), sorted(folders - set(listed))
    names = [p.name for p in (root / "tests").rglob("*.py")]
    assert len(names) == len(set(names)), "two test modules share a name: they import each other by it"


def test_the_suite_runs_from_a_folder_not_named_like_a_python_package(tmp_path):
    """An archive unpacks as ``attnc-main``: pytest must not import the root ``__init__.py`` (the
    package itself) under that folder's name, which errored every test."""
    import pathlib
    import shutil
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[2]
    copy = tmp_path / "attnc-main"
    (copy / "tests").mkdir(parents=True)
    for name in ("pyproject.toml", "__init__.py", "tests/conftest.py", "tests/interpreter_speed.py"):
        shutil.copy(root / name, copy / name)
    (copy / "tests" / "test_probe.py").write_text("def test_probe():\n    assert True\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/test_probe.py"], cwd=copy,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout + proc.stderr
