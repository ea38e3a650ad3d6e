# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""IPsec in the kernel: read the node's key file, check the kernel can do it, bring the XFRM states
and policies we own to the plan of ``ipsec.py`` (through the codec of ``xfrm.py``).

Order of work, so a failed run changes nothing: key file (owner, mode, format) -> plan (every peer,
SPI collisions) -> capability (an SA with each key's algorithms in a scratch network namespace:
"the kernel has no ESP" names the module) -> the kernel's current states and policies -> the
difference, applied in the order ``ipsec.diff_ipsec`` gives (block policies first, states before the
policies that use them, out policies switched atomically, obsolete things last).

Which peers are direct and which tunnelled is decided where routing decides it
(``routing_plan.plan_routing`` over the underlay prefix), so encryption always matches the routes.
"""

from __future__ import annotations

import os
import stat
from dataclasses import replace

from . import ipsec
from .files import ensure_dir, ensure_file, file_differs
from .kernel_features import ProbeError, call_in_scratch_netns
from .routing_plan import plan_routing
from .xfrm import XfrmError, XfrmSocket, XfrmState

try:
    from pyroute2 import IPRoute
except ImportError as exc:  # modules report it with missing_requirements
    IPRoute = None
    IMPORT_ERROR = exc
else:
    IMPORT_ERROR = None

STATES = ("present", "absent")
DEFAULT_KEY_FILE = "/etc/clustermesh/ipsec/keys"
KEY_FILE_MODE = 0o600
KEY_DIR_MODE = 0o700
# addresses of the throwaway SA the capability check adds in its scratch namespace (lab underlay range)
PROBE_SRC = "198.18.255.1"
PROBE_DST = "198.18.255.2"


class IpsecStateError(RuntimeError):
    """The node cannot do what was asked (key file, kernel feature, a kernel refusal)."""


def read_key_file(path):
    """The keys of the node's key file. It must be a regular file owned by root and readable by its
    owner only (0600 or stricter): anything else is refused before it is read."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise IpsecStateError(
            "key file %s does not exist on this node; role clustermesh.core.encryption writes it from "
            "clustermesh_ipsec_key or clustermesh_ipsec_key_file" % path
        ) from None
    except OSError as exc:
        raise IpsecStateError("key file %s: %s" % (path, exc.strerror)) from None
    if not stat.S_ISREG(st.st_mode):
        raise IpsecStateError("key file %s is not a regular file" % path)
    if st.st_mode & 0o077:
        raise IpsecStateError(
            "key file %s has mode %04o: it holds key material and must be readable by its owner only "
            "(chmod 0600)" % (path, stat.S_IMODE(st.st_mode))
        )
    if st.st_uid != 0:
        raise IpsecStateError("key file %s is owned by uid %d, not root" % (path, st.st_uid))
    with open(path, encoding="ascii", errors="replace") as handle:
        text = handle.read()
    try:
        return ipsec.parse_key_file(text)
    except ipsec.IpsecKeyError as exc:
        raise IpsecStateError("key file %s: %s" % (path, exc)) from None


BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def node_keys(path=DEFAULT_KEY_FILE, boot_id_file=BOOT_ID_FILE):
    """What the encryption role needs to know of a node before it plans: ``boot_id`` (per-pair keys mix
    it in), ``keys`` (the key lines of the node's key file in their canonical form, ``ipsec.format_key_line``:
    key material), ``key_ids`` and ``warnings``. A missing key file is no keys; a key file this module
    would refuse (mode, owner, format) is no keys and a warning naming the problem: the next apply
    rewrites it."""
    with open(boot_id_file, encoding="ascii") as handle:
        boot_id = handle.read().strip()
    warnings = []
    keys = []
    if os.path.lexists(path):
        try:
            keys = read_key_file(path)
        except IpsecStateError as exc:
            warnings.append("%s; it is rewritten by the next apply" % exc)
    return {
        "boot_id": boot_id,
        "keys": [ipsec.format_key_line(key) for key in keys],
        "key_ids": [key.key_id for key in keys],
        "warnings": warnings,
    }


def key_file_text(keys):
    """The key file for ``keys`` (first line: the key that encrypts)."""
    return "".join(ipsec.format_key_line(key) + "\n" for key in keys).encode("ascii")


def _probe_algorithms(probes):
    """In a scratch network namespace: add one SA per (label, algorithms); the kernel's refusal per label."""
    errors = {}
    with XfrmSocket() as sock:
        for spi, (label, algorithms) in enumerate(probes, start=0x100):
            state = XfrmState(src=PROBE_SRC, dst=PROBE_DST, spi=spi, reqid=ipsec.REQID, **algorithms)
            try:
                sock.add_state(state)
            except XfrmError as exc:
                errors[label] = exc.reason
    return errors


def check_capability(keys):
    """Raise IpsecStateError naming the missing kernel feature when this kernel cannot install an ESP
    SA with the algorithms of ``keys`` (tried for real, with a zero key, in a scratch namespace that
    dies with the probe: nothing is left behind)."""
    # plain ESP first: when the AEAD is refused as an unknown algorithm, this tells whether ESP itself is there
    esp = ipsec.parse_key_line("1 hmac(sha256) %s cbc(aes) %s" % ("00" * 32, "00" * 16))
    probes = [("ESP", ipsec.state_algorithms(esp, PROBE_SRC, PROBE_DST))]
    for key in keys:
        algorithms = ipsec.state_algorithms(key, PROBE_SRC, PROBE_DST)
        zeroed = {name: replace(alg, key=bytes(len(alg.key))) for name, alg in algorithms.items()}
        probes.append(("key %d (%s)" % (key.key_id, ipsec.algorithm_label(key)), zeroed))
    try:
        errors = call_in_scratch_netns(lambda: _probe_algorithms(probes))
    except ProbeError as exc:
        raise IpsecStateError("cannot check the kernel's IPsec support: %s; nothing was changed" % exc) from None
    if errors:
        raise IpsecStateError(
            "this kernel cannot encrypt with ESP: %s; nothing was changed"
            % "; ".join("%s: %s" % (label, errors[label]) for label, _algorithms in probes if label in errors)
        )


def peer_modes(node, peers, mode, external_router=False):
    """Peer name -> direct | tunnel | external, as the routing plan decides it on this node's underlay."""
    if IPRoute is None:
        raise IpsecStateError("pyroute2 is not importable (%s); install requirements/node.txt" % IMPORT_ERROR)
    from .routing_state import RoutingStateError, underlay_link

    with IPRoute() as ipr:
        try:
            underlay = underlay_link(ipr, node["ip"])
        except RoutingStateError as exc:
            raise IpsecStateError(str(exc)) from None
    plan = plan_routing(node, peers, mode, underlay["prefixlen"], external_router=external_router)
    return dict(plan.peer_modes)


def _apply(sock, changes):
    for done, (verb, obj) in enumerate(changes.actions):
        try:
            getattr(sock, verb)(obj)
        except XfrmError as exc:
            raise IpsecStateError(
                "%s (after %d of %d changes; rerun to finish: the order keeps pod traffic from leaving "
                "in plaintext)" % (exc, done, len(changes.actions))
            ) from None


def reconcile(
    node,
    peers,
    mode,
    key_file=DEFAULT_KEY_FILE,
    keys=None,
    encrypt_key_id=None,
    block_cidrs=(),
    node_encryption=False,
    external_router=False,
    boot_ids=None,
    state="present",
    check=False,
):
    """Bring this node's XFRM states and policies to the plan (``state=present``) or remove all of
    ours (``state=absent``). With ``check`` nothing is changed.

    ``keys`` (key lines) are written to ``key_file`` (root, 0600, directory 0700) once every check
    has passed, before the kernel changes; without them the keys are read from ``key_file``.

    Returns {changed, changes (lines without key material), key_ids, encrypt_key_id, states,
    policies, peer_modes, summary}. Raises ipsec.IpsecKeyError/IpsecPlanError (input) or
    IpsecStateError (node, kernel)."""
    if state not in STATES:
        raise ipsec.IpsecPlanError(["state: %r is not one of %s" % (state, ", ".join(STATES))])
    result = {"key_ids": [], "encrypt_key_id": None, "states": 0, "policies": 0, "peer_modes": {}}
    key_file_change = None
    if state == "present":
        if keys is None:
            keys = read_key_file(key_file)
        else:
            keys = ipsec.parse_key_file("\n".join(keys))
            key_file_change = file_differs(key_file, key_file_text(keys), KEY_FILE_MODE)
        if encrypt_key_id is None:
            encrypt_key_id = keys[0].key_id
        modes = peer_modes(node, peers, mode, external_router)
        boot_ids = boot_ids or {}
        node = dict(node, boot_id=boot_ids.get(node["name"], ""))
        peers = [dict(p, mode=modes.get(p["name"], "direct"), boot_id=boot_ids.get(p["name"], "")) for p in peers]
        plan = ipsec.plan_ipsec(node, peers, keys, encrypt_key_id, list(block_cidrs), node_encryption=node_encryption)
        check_capability(keys)
        result.update(
            key_ids=[k.key_id for k in keys],
            encrypt_key_id=encrypt_key_id,
            states=len(plan.states),
            policies=len(plan.policies),
            peer_modes=modes,
        )
    try:
        with XfrmSocket() as sock:
            current_states, current_policies = sock.states(), sock.policies()
            if state == "present":
                changes = ipsec.diff_ipsec(current_states, current_policies, plan)
                problems = changes.rekey_problems() + list(changes.conflicts)
                if problems:
                    raise IpsecStateError("%s; nothing was changed" % "; ".join(problems))
            else:
                changes = ipsec.removal(current_states, current_policies)
                key_file_change = "removed" if os.path.lexists(key_file) else None
            if not check:
                if state == "absent" and key_file_change:
                    os.unlink(key_file)
                elif key_file_change:
                    ensure_dir(os.path.dirname(key_file), KEY_DIR_MODE)
                    ensure_file(key_file, key_file_text(keys), KEY_FILE_MODE)
                _apply(sock, changes)
    except XfrmError as exc:
        raise IpsecStateError(str(exc)) from None
    lines = changes.describe()
    if key_file_change:
        key_ids = ", ".join(map(str, result["key_ids"])) or "none"
        lines.insert(0, "~ key file %s (%s; key IDs %s)" % (key_file, key_file_change, key_ids))
    result.update(changed=bool(changes.actions or key_file_change), changes=lines, summary=changes.summary())
    return result
