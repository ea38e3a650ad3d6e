# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Which third-party Python packages a library file needs, and a clear message when one is missing.

Library files import their third-party packages inside ``try`` and keep the failure in
``IMPORT_ERROR``, so a module can still start and say what to install instead of crashing.
"""

from __future__ import annotations

import sys

# library file (module name) -> what to pip install (see requirements/node.txt)
PACKAGES = {
    "kvstore_client": "grpcio, protobuf and etcd-sdk-python",
    "kvstore_config": "PyYAML",
    "mesh_model": "netaddr",
    "pki": "cryptography",
    "routing_state": "pyroute2",
    "ipsec_state": "pyroute2",
    "agent_metrics": "prometheus_client",
    "pod_network": "pyroute2",
    "policy": "PyYAML",
}


def missing_requirements(*libraries):
    """A message naming what to install for the libraries whose imports failed, or None."""
    missing = []
    for lib in libraries:
        error = getattr(lib, "IMPORT_ERROR", None)
        if error is not None:
            name = lib.__name__.rsplit(".", 1)[-1]
            missing.append("%s (for %s: %s)" % (PACKAGES.get(name, name), name, error))
    if not missing:
        return None
    return "missing Python packages on this node for %s: %s; install requirements/node.txt into that Python" % (
        sys.executable,
        "; ".join(missing),
    )
