"""Documentation that is generated must be current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_model_trees_in_docs_are_current():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_model_docs.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_seed_section_is_in_the_models_table():
    text = (ROOT / "docs" / "models.md").read_text()
    for section in ["§2.1", "§2.2", "§2.3", "§3.1", "§3.2", "§3.3", "§3.4", "§3.5", "§3.6",
                    "§4.1", "§4.2", "§4.3", "§5", "§6.1", "§6.2", "§7"]:  # fmt: skip
        assert f"| {section}" in text, section
