"""The lab shared by several test modules: one converged mesh instead of one per module.

``shared_mesh`` (session scope) brings up the default lab under prefix cmsh (cluster1 = c1-n1, c1-n2;
cluster2 = c2-n1, c2-n2) and converges playbooks/site.yml once; it yields that first run's
PlaybookRun. The modules that use it (SHARED_LAB_MODULES) run last, in that order, so the lab is
torn down right after them; each leaves the mesh as the next one needs it (see their docstrings).

CLUSTERMESH_TEST_REUSE_LAB=1 reuses a lab kept by CLUSTERMESH_TEST_KEEP_LAB=1 (nothing is set up or
removed; the fixture then yields None).
"""

from __future__ import annotations

import os

import pytest

from .labtools import REPO_ROOT, inventory_path, lab, playbook

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_PREFIX = "cmsh"
SITE = os.path.join(REPO_ROOT, "playbooks", "site.yml")
# the order they run in: the last one may leave state the others would trip over
SHARED_LAB_MODULES = ("test_global_services.py", "test_network_policy.py", "test_control_plane.py")


def reusing_lab(prefix=SHARED_PREFIX):
    return bool(os.environ.get("CLUSTERMESH_TEST_REUSE_LAB")) and os.path.exists(inventory_path(prefix))


@pytest.fixture(scope="session")
def shared_mesh():
    if reusing_lab():
        yield None  # a developer's shortcut: the lab of a previous run, kept
        return
    lab("down", prefix=SHARED_PREFIX, check=False)
    lab("up", prefix=SHARED_PREFIX)
    try:
        yield playbook(SHARED_PREFIX, SITE)
    finally:
        if not os.environ.get("CLUSTERMESH_TEST_KEEP_LAB"):
            lab("down", prefix=SHARED_PREFIX, check=False)


def pytest_collection_modifyitems(session, config, items):
    """Move the tests of the shared lab to the end, module by module in SHARED_LAB_MODULES order."""

    def rank(item):
        path = str(item.path)
        if os.path.dirname(path) != HERE or os.path.basename(path) not in SHARED_LAB_MODULES:
            return 0
        return SHARED_LAB_MODULES.index(os.path.basename(path)) + 1

    items[:] = sorted(items, key=rank)  # stable: everything else keeps its order
