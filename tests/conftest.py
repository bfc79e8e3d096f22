"""pytest setup for the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

try:
    # Triton decides when it is first imported whether its own jitted builtins (tl.sum, tl.max, ...) are
    # interpreted: some test modules set TRITON_INTERPRET=1 when they are collected, and the offline GPU
    # compile checks need those builtins native. ``import attnc`` no longer imports the runtime (its
    # public names load when first used), so Triton is imported here, before any module is collected.
    import triton  # noqa: F401
except ModuleNotFoundError:  # the CPU path runs without Triton
    pass

import interpreter_speed

#: The repository root: the ``attnc`` package itself (its ``__init__.py``), named after whatever
#: folder holds the checkout (``attnc-main`` when an archive unpacks).
REPO_ROOT = Path(__file__).resolve().parents[1]


class _RootIsNoTestPackage:
    """Collects the repository root as a plain folder, not a test package.

    pytest collects a folder with an ``__init__.py`` as a package and imports that file under the
    folder's name: ``attnc-main`` is no Python name, so the package's relative imports failed and
    every test errored. The root holds no tests, so nothing of it need be imported here; the tests
    import the installed ``attnc``. (A conftest hook cannot do this: the root is collected with the
    hooks of its parent folder, so this one is registered as a plugin.)
    """

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector):
        if path.resolve() == REPO_ROOT:
            return pytest.Dir.from_parent(parent, path=path)
        return None


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_RootIsNoTestPackage(), "attnc-root-is-no-test-package")
    interpreter_speed.follow_the_environment()
    if getattr(config.option, "dist", None) == "loadgroup":  # the controller (xdist sets "no" in its workers)
        import xdist

        if _release(pytest.__version__) >= (9, 2) and _release(xdist.__version__) <= (3, 8, 0):
            raise pytest.UsageError(
                f"pytest {pytest.__version__} with pytest-xdist {xdist.__version__}: --dist loadgroup no longer keeps "
                "a group's tests on one worker (pytest-xdist issue 1386), so the context-parallel modules would spawn "
                "their ranks on every worker; install the test extra's pytest (<9.2): pip install -e '.[test]'")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # one xdist worker per core already fills the cores: torch's own thread pool on top of that (a thread
        # per core in every worker) only makes the workers' threads wait for each other
        import torch

        torch.set_num_threads(1)



@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The context-parallel modules spawn their ranks once per worker that runs them (a module fixture), so each
    must run on one worker: ``--dist loadgroup`` sends a group's tests to one worker by a suffix xdist adds to
    their node ids. pytest 9.2 no longer lets xdist (3.8) add it (pytest-xdist issue 1386): the tests then
    spread over the workers, each spawning the ranks again. Refused here, loudly, rather than run twice as
    long."""
    if not getattr(config.option, "loadgroup", False):  # set in xdist's workers under --dist loadgroup
        return
    lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") is not None
            and item.nodeid.rfind("@") <= item.nodeid.rfind("]")]
    if lost:
        raise pytest.UsageError(f"--dist loadgroup does not group {lost[0]} (and {len(lost) - 1} more) with this "
                                f"pytest {pytest.__version__}: install the test extra's pytest (<9.2)")
