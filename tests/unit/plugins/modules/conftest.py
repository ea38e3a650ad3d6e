"""Module tests run many modules in one process, beside controller code (action plugin tests): each
module test runs as on a node, with no warnings left over from another test."""

from __future__ import annotations

import pytest
from ansible.module_utils import _internal
from ansible.module_utils.common import warnings


@pytest.fixture(autouse=True)
def _as_on_a_node(monkeypatch):
    # Importing controller code (an action plugin) flips this flag, after which AnsibleModule.warn
    # prints through the controller's Display instead of returning warnings with the result.
    monkeypatch.setattr(_internal, "is_controller", False)
    warnings._global_warnings.clear()
    warnings._global_deprecations.clear()
    yield
