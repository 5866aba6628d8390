"""Generate bindings/ from yang/ with pyangbind.  Never edit bindings/ by hand.

Usage: python tools/gen_bindings.py [OUTPUT_DIR]   (default: bindings/)
tests/test_bindings.py regenerates into a temporary directory and fails when
the committed files differ, so a model change without `make bindings` is caught.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyangbind

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nc_core.schema import CEVPN_YANG_DIR, ietf_module_dirs  # noqa: E402

# One binding module per served module; cevpn-types is compiled into both.
BOUND_MODULES = ("cevpn-ce", "cevpn-service")


def binding_name(module: str) -> str:
    return module.replace("-", "_") + ".py"


def generate(out_dir: Path) -> list[Path]:
    plugin_dir = Path(pyangbind.__file__).parent / "plugin"
    search = [CEVPN_YANG_DIR, *ietf_module_dirs()]
    written = []
    for module in BOUND_MODULES:
        target = out_dir / binding_name(module)
        cmd = [
            sys.executable, "-m", "pyang",
            "--plugindir", str(plugin_dir),
            "-f", "pybind",
            "--use-xpathhelper",
            "-p", ":".join(str(d) for d in search),
            "-o", str(target),
            str(CEVPN_YANG_DIR / f"{module}.yang"),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, cwd=ROOT)
        written.append(target)
    written.append(write_identities(out_dir / IDENTITIES))
    return written


IDENTITIES = "cevpn_identities.py"


def write_identities(target: Path) -> Path:
    """cevpn-types' identity derivation as a table (the server's strength checks)."""
    from nc_server.compiler import identity_ancestors_from_yang

    rows = "".join(
        f"    {name!r}: {ancestors!r},\n"
        for name, ancestors in identity_ancestors_from_yang().items()
    )
    target.write_text(
        '"""cevpn-types identities -> themselves and every identity they derive from.\n\n'
        "Generated from yang/cevpn-types.yang by tools/gen_bindings.py (`make bindings`);\n"
        'never edit by hand: tests/test_bindings.py fails when it is stale."""\n\n'
        f"ANCESTORS: dict[str, tuple[str, ...]] = {{\n{rows}}}\n"
    )
    return target


def main() -> None:
    out_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bindings"
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in generate(out_dir):
        print(f"generated {path}")


if __name__ == "__main__":
    main()
