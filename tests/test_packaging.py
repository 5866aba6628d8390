"""The wheel is the product: built from the checkout, installed into a fresh virtualenv,
both commands work from a directory outside the checkout, YANG modules included."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "tests" / "examples" / "valid" / "service-three-vpns.xml"

pytestmark = pytest.mark.slow


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def checkout_copy(target: Path) -> Path:
    """The checkout's files (tracked, and new ones git does not ignore) in ``target``:
    a build there leaves nothing behind in the checkout (no build/, no egg-info) and
    takes nothing stale from an earlier one.  Git is pointed at the checkout's
    repository so setup.py records its commit as it would in place."""
    files = git("ls-files", "--cached", "--others", "--exclude-standard", "-z").split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding the wheel; its dependencies are the development venv's
    (read through a .pth line, no network), never its cevpn."""
    base = tmp_path_factory.mktemp("wheel")
    source = checkout_copy(base / "src")
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["GIT_DIR"] = git("rev-parse", "--absolute-git-dir")
    env["GIT_WORK_TREE"] = str(source)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(base / "dist"), "."],
        cwd=source, env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = (base / "dist").glob("cevpn-*.whl")
    target = base / "venv"
    venv.create(target, with_pip=False)
    purelib = Path(
        sysconfig.get_path("purelib", vars={"base": str(target), "platbase": str(target)})
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
         "--target", str(purelib), str(wheel)],
        env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    # pip --target puts console scripts in purelib/bin: move them where a venv has them.
    for script in (purelib / "bin").iterdir():
        text = script.read_text().splitlines()
        text[0] = f"#!{target / 'bin' / 'python'}"
        (target / "bin" / script.name).write_text("\n".join(text) + "\n")
        (target / "bin" / script.name).chmod(0o755)
    (purelib / "cevpn-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return target


def run_installed(venv_dir: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(venv_dir / "bin" / args[0]), *args[1:]],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_wheel_carries_the_yang_modules_and_its_commit(installed: Path) -> None:
    (package,) = installed.glob("lib/python*/site-packages/nc_core")
    assert {p.name for p in (ROOT / "yang").glob("*.yang")} == {
        p.name for p in (package / "yang").glob("*.yang")
    }
    assert git("rev-parse", "HEAD") in (package / "_build_info.py").read_text()


@pytest.mark.parametrize("command", ["cevpn-server", "cevpn-agent"])
def test_version_from_the_wheel_names_the_commit_it_was_built_from(
    installed: Path, tmp_path: Path, command: str
) -> None:
    result = run_installed(installed, tmp_path, command, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{command} 0.")
    assert f"(commit {git('rev-parse', 'HEAD')}" in result.stdout
    assert result.stderr == ""


def test_validate_from_the_wheel_outside_the_checkout(installed: Path, tmp_path: Path) -> None:
    document = shutil.copy(EXAMPLE, tmp_path / EXAMPLE.name)
    result = run_installed(installed, tmp_path, "cevpn-server", "validate", str(document))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{document}: valid\n"
    assert result.stderr == ""  # no warning either


def test_the_installed_commands_run_the_wheel_not_the_checkout(
    installed: Path, tmp_path: Path
) -> None:
    code = "import nc_core.schema as s; print(s.__file__); print(s.CEVPN_YANG_DIR)"
    result = run_installed(installed, tmp_path, "python", "-c", code)
    module, yang = result.stdout.split()
    assert Path(module).is_relative_to(installed) and Path(yang).is_relative_to(installed)


def test_an_editable_checkout_prints_its_head() -> None:
    from nc_core.version import version_text

    assert version_text("cevpn-agent").endswith(f"(commit {git('rev-parse', 'HEAD')})")
