# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Role agent, agent_state=absent: detach the datapath from the pod veths and remove the pinned maps.

    python3 agent_datapath_remove.py BUNDLE PIN_DIR check|apply

BUNDLE is the installed meshd (or meshctl) node bundle: its zip holds the collection's library as the
package ``clustermesh_lib``, so the detach is the library's own (``bpf_loader.detach``: only our two tc
filters, by handle and priority, on ``cm_*`` devices). PIN_DIR (under /sys/fs/bpf/clustermesh/) is removed
with everything pinned in it. ``check`` only reports. Prints one JSON object: {"detached": [devices],
"pin_dir": path or null (removed), "bundle": bool}. Runs inside the node's network and mount namespaces.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys

PIN_ROOT = "/sys/fs/bpf/clustermesh/"


def main(argv):
    if len(argv) != 3 or argv[2] not in ("check", "apply"):
        sys.stderr.write("usage: agent_datapath_remove.py BUNDLE PIN_DIR check|apply\n")
        return 2
    bundle, pin_dir, mode = argv
    apply = mode == "apply"
    if not pin_dir.startswith(PIN_ROOT) or ".." in pin_dir.split("/"):
        sys.stderr.write("pin directory %s is not under %s; refusing to remove it\n" % (pin_dir, PIN_ROOT))
        return 2
    result = {"detached": [], "pin_dir": None, "bundle": os.path.isfile(bundle)}
    if result["bundle"]:
        sys.path.insert(0, bundle)  # zipimport: the bundle is a zip behind its shebang line
        from clustermesh_lib import bpf_loader

        for _index, name in socket.if_nameindex():
            if not name.startswith("cm_"):
                continue
            try:
                if not any(bpf_loader.attached(name).values()):
                    continue
                if apply:
                    bpf_loader.detach(name)
            except bpf_loader.LoaderError as exc:
                if "no interface" in str(exc):  # a pod went away meanwhile
                    continue
                raise
            result["detached"].append(name)
    if os.path.isdir(pin_dir):
        result["pin_dir"] = pin_dir
        if apply:
            shutil.rmtree(pin_dir)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
