"""The tree is the data flow: imports go data -> model -> training -> inference -> cli, with no cycles
(pyproject.toml [tool.importlinter], checked by import-linter on a plain build of the package)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_go_one_way_and_no_package_has_a_cycle():
    if shutil.which("lint-imports") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("import-linter is part of the test extra and must be installed in CI")
        pytest.skip("import-linter not installed (pip install -e '.[test]')")
    run = subprocess.run(["bash", str(ROOT / ".ci" / "lint-imports")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert run.stdout.count("KEPT") == 2 and "BROKEN" not in run.stdout
