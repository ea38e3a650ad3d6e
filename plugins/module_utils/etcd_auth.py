# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""etcd users and roles of a cluster's kvstore, reconciled to what the mesh needs.

Users have no password: etcd maps the client certificate's CN to the user. ``root`` administers;
``admin-<cluster>`` reads and writes ``cilium/``; every cluster that connects to this one gets
``remote-<peer>`` with the role ``remote``, which may only read what Cilium lets remote clusters
read (control_plane.remote_read_keys). Users named ``remote-*`` or ``admin-*`` that are no longer
wanted are removed; other users are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .control_plane import REMOTE_ROLE, admin_user, remote_read_keys, remote_user
from .kvstore_client import Permission, prefix_range_end

ROOT = "root"
MANAGED_USER_PREFIXES = ("remote-", "admin-")


@dataclass(frozen=True)
class Grant:
    permission: str
    key: str
    prefix: bool

    def matches(self, perm: Permission) -> bool:
        end = prefix_range_end(self.key.encode()).decode() if self.prefix else None
        return perm.permission == self.permission and perm.key == self.key and (perm.range_end or None) == end


@dataclass
class AuthPlan:
    roles: dict = field(default_factory=dict)  # role -> [Grant]
    users: dict = field(default_factory=dict)  # user -> [role]


def desired_auth(cluster, remote_clusters):
    plan = AuthPlan()
    plan.roles[ROOT] = []
    plan.roles[admin_user(cluster)] = [Grant("readwrite", "cilium/", True)]
    plan.roles[REMOTE_ROLE] = [Grant("read", key, is_prefix) for key, is_prefix in remote_read_keys(cluster)]
    plan.users[ROOT] = [ROOT]
    plan.users[admin_user(cluster)] = [admin_user(cluster)]
    for peer in sorted(set(remote_clusters)):
        if peer == cluster:
            raise ValueError("remote_clusters: %r is this cluster itself" % peer)
        plan.users[remote_user(peer)] = [REMOTE_ROLE]
    return plan


def reconcile_auth(client, plan, check_mode=False):
    """Bring users, roles and auth to ``plan``; return the list of changes made (or to make)."""
    changes = []

    def do(description, func, *args, **kwargs):
        changes.append(description)
        if not check_mode:
            func(*args, **kwargs)

    existing_roles = set(client.role_list())
    for role, grants in plan.roles.items():
        if role not in existing_roles:
            do("add role %s" % role, client.role_add, role)
            current = []
        else:
            current = client.role_get(role)
        if role == ROOT:
            continue  # etcd's root role has every permission built in
        for grant in grants:
            if not any(grant.matches(p) for p in current):
                do(
                    "grant %s %s%s to %s" % (grant.permission, grant.key, "*" if grant.prefix else "", role),
                    client.role_grant_permission,
                    role,
                    grant.key,
                    permission=grant.permission,
                    prefix=grant.prefix,
                )
        for perm in current:
            if not any(g.matches(perm) for g in grants):
                do(
                    "revoke %s %s from %s" % (perm.permission, perm.key, role),
                    client.role_revoke_permission,
                    role,
                    perm.key,
                    range_end=perm.range_end,
                )
    existing_users = set(client.user_list())
    # root first: enabling auth needs it, and without it we would lock ourselves out
    for user in sorted(plan.users, key=lambda u: u != ROOT):
        roles = plan.users[user]
        if user not in existing_users:
            do("add user %s" % user, client.user_add, user)
            current_roles = []
        else:
            current_roles = client.user_get(user)
        for role in roles:
            if role not in current_roles:
                do("grant role %s to user %s" % (role, user), client.user_grant_role, user, role)
        for role in current_roles:
            if role not in roles:
                do("revoke role %s from user %s" % (role, user), client.user_revoke_role, user, role)
    for user in sorted(existing_users - set(plan.users)):
        if user.startswith(MANAGED_USER_PREFIXES):
            do("remove user %s" % user, client.user_delete, user)
    if not client.auth_enabled():
        do("enable auth", client.auth_enable)
    return changes
