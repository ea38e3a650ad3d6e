"""Every test here runs inside tools/vm-run's VM (docs/vm-lab.md): `tools/run-tests vm`, or
`tools/vm-run -- .venv/bin/pytest -q -p no:cacheprovider tests/vm`.

The session fixture ``vm`` (autouse) fails every test at once, with the way to run them, when
pytest runs on the host; inside the VM it checks that the kernel has ESP (``modprobe esp4``).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from .vmtools import RESULTS, in_vm


@pytest.fixture(scope="session", autouse=True)
def vm():
    """The VM this session runs in; yields the results directory shared with the host."""
    if not in_vm():
        pytest.fail(
            "tests/vm run inside the VM only (CLUSTERMESH_IN_VM=1 is not set): "
            "tools/run-tests vm, or tools/vm-run -- .venv/bin/pytest -q -p no:cacheprovider tests/vm",
            pytrace=False,
        )
    assert os.geteuid() == 0, "the VM runs its command as root"
    proc = subprocess.run(["modprobe", "esp4"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, "modprobe esp4 failed in the VM (%s): %s" % (os.uname().release, proc.stderr)
    yield RESULTS
