"""Build hooks: the YANG modules and the commit a wheel is built from go into the package.

Everything else is declared in pyproject.toml.  ``build_py`` copies ``yang/*.yang``
(the single source of truth, kept at the top of the checkout for pyang, yanglint and
the docs) into ``nc_core/yang/`` of the built package, and writes
``nc_core/_build_info.py`` with the git commit of the checkout, which
``cevpn-server --version`` prints.  An editable install gets neither: it reads
``yang/`` and asks git for HEAD at run time (nc_core/version.py).  An sdist carries
``_build_info.py`` too, so a wheel built from it keeps the commit of its checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
BUILD_INFO = "nc_core/_build_info.py"


def git_commit() -> str:
    """The checkout's commit (with '-dirty' if it has uncommitted changes), or 'unknown'."""
    explicit = os.environ.get("CEVPN_BUILD_COMMIT")
    if explicit:
        return explicit
    shipped = HERE / BUILD_INFO  # building from an sdist: its recorded commit
    if shipped.exists() and not (HERE / ".git").exists():
        scope: dict[str, str] = {}
        exec(shipped.read_text(), scope)  # noqa: S102 - our own generated file
        return scope["COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def build_info_text() -> str:
    return (
        '"""Written by setup.py when the package was built: never edited, never committed."""\n\n'
        f"COMMIT = {git_commit()!r}\n"
    )


class BuildPy(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads yang/ and git at run time
        target = Path(self.build_lib) / "nc_core"
        yang = target / "yang"
        yang.mkdir(parents=True, exist_ok=True)
        for module in sorted((HERE / "yang").glob("*.yang")):
            shutil.copyfile(module, yang / module.name)
        (target / "_build_info.py").write_text(build_info_text())


class Sdist(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        (Path(base_dir) / BUILD_INFO).write_text(build_info_text())


setup(cmdclass={"build_py": BuildPy, "sdist": Sdist})
