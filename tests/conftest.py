"""Makes the collection importable as ``ansible_collections.clustermesh.core`` for pytest.

ansible-test needs a physical ansible_collections/clustermesh/core tree; plain pytest is
happy with a symlink to the repository root under build/, which keeps tests running
against the working tree without a copy.
"""

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COLLECTIONS_ROOT = os.path.join(REPO_ROOT, "build", "pytest-collections")
_LINK = os.path.join(_COLLECTIONS_ROOT, "ansible_collections", "clustermesh", "core")

if not os.path.islink(_LINK):
    os.makedirs(os.path.dirname(_LINK), exist_ok=True)
    try:
        os.symlink(REPO_ROOT, _LINK)
    except FileExistsError:
        pass
if _COLLECTIONS_ROOT not in sys.path:
    sys.path.insert(0, _COLLECTIONS_ROOT)
