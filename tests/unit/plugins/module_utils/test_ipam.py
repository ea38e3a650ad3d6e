"""The pod IPAM: reserved addresses, reuse on a repeated ADD, release, exhaustion, concurrency."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils.ipam import (
    IpamError,
    PodIpam,
    read_allocations,
    usable_range,
)


def test_network_broadcast_and_node_address_are_never_given(tmp_path):
    ipam = PodIpam(str(tmp_path), "net", "10.1.0.0/29")  # .0 network, .1 node, .7 broadcast
    got = [ipam.allocate("c%d" % i, "eth0")[0] for i in range(5)]
    assert got == ["10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5", "10.1.0.6"]
    with pytest.raises(IpamError) as exc:
        ipam.allocate("c9", "eth0")
    assert exc.value.reason == "exhausted"
    assert "no free address in pod CIDR 10.1.0.0/29: all 5 pod addresses are allocated" in str(exc.value)


def test_usable_range_sizes():
    assert usable_range("10.1.0.0/24")[1] == 253
    assert str(usable_range("10.1.0.0/24")[0]) == "10.1.0.2"
    assert usable_range("10.1.0.0/30")[1] == 1
    assert usable_range("10.1.0.0/31") == (None, 0)


def test_a_repeated_add_gets_the_same_address(tmp_path):
    ipam = PodIpam(str(tmp_path), "net", "10.1.0.0/24")
    first, new = ipam.allocate("abc", "eth0", {"labels": {"app": "web"}})
    assert new
    again, new = ipam.allocate("abc", "eth0")
    assert (again, new) == (first, False)
    # another interface of the same container is another attachment
    other, new = ipam.allocate("abc", "net1")
    assert other != first and new


def test_release_frees_only_that_attachment_and_is_idempotent(tmp_path):
    ipam = PodIpam(str(tmp_path), "net", "10.1.0.0/30")  # exactly one pod address: .2
    ip = ipam.allocate("a", "eth0")[0]
    assert ip == "10.1.0.2"
    with pytest.raises(IpamError):
        ipam.allocate("b", "eth0")
    assert ipam.release("b", "eth0") == []  # not held: not an error
    assert ipam.release("a", "eth0") == ["10.1.0.2"]
    assert ipam.release("a", "eth0") == []
    assert ipam.allocate("b", "eth0")[0] == "10.1.0.2"  # the released address is taken by the next ADD


def test_round_robin_does_not_hand_out_a_just_released_address(tmp_path):
    ipam = PodIpam(str(tmp_path), "net", "10.1.0.0/24")
    a = ipam.allocate("a", "eth0")[0]
    ipam.release("a", "eth0")
    b = ipam.allocate("b", "eth0")[0]
    assert (a, b) == ("10.1.0.2", "10.1.0.3")


def test_labels_and_details_are_stored_with_the_allocation(tmp_path):
    ipam = PodIpam(str(tmp_path), "clustermesh", "10.1.0.0/24")
    ip = ipam.allocate("abc", "eth0", {"labels": {"app": "web"}, "args": {"K8S_POD_NAME": "web-0"}})[0]
    ipam.update(ip, "abc", "eth0", hostInterface="cm_0123456789a", mac="02:00:00:00:00:01")
    with open(os.path.join(str(tmp_path), "clustermesh", ip), encoding="utf-8") as handle:
        record = json.load(handle)
    assert record == {
        "containerID": "abc",
        "ifname": "eth0",
        "labels": {"app": "web"},
        "args": {"K8S_POD_NAME": "web-0"},
        "hostInterface": "cm_0123456789a",
        "mac": "02:00:00:00:00:01",
    }
    assert read_allocations(str(tmp_path), "clustermesh") == [dict(record, ip=ip)]
    assert ipam.lookup("abc", "eth0") == ip and ipam.lookup("abc", "net1") is None
    with pytest.raises(IpamError, match="belongs to another attachment"):
        ipam.update(ip, "other", "eth0", mac="x")


def test_host_local_files_are_understood(tmp_path):
    directory = tmp_path / "net"
    directory.mkdir()
    (directory / "10.1.0.2").write_text("legacy-container\r\neth0")
    ipam = PodIpam(str(tmp_path), "net", "10.1.0.0/24")
    assert ipam.lookup("legacy-container", "eth0") == "10.1.0.2"
    assert ipam.allocate("new", "eth0")[0] == "10.1.0.3"
    assert ipam.release("legacy-container", "eth0") == ["10.1.0.2"]


def test_unwritable_state_directory_is_an_io_error(tmp_path):
    (tmp_path / "blocker").write_text("a file where the directory should be")
    ipam = PodIpam(str(tmp_path / "blocker"), "net", "10.1.0.0/24")
    with pytest.raises(IpamError) as exc:
        ipam.allocate("a", "eth0")
    assert exc.value.reason == "io" and "cannot open the IPAM state directory" in str(exc.value)


def _allocate_many(args):
    data_dir, worker = args
    ipam = PodIpam(data_dir, "net", "10.1.0.0/24")
    return [ipam.allocate("w%d-%d" % (worker, i), "eth0")[0] for i in range(15)]


def test_concurrent_adds_never_share_an_address(tmp_path):
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_allocate_many, [(str(tmp_path), w) for w in range(4)])
    addresses = [ip for batch in results for ip in batch]
    assert len(addresses) == 60 and len(set(addresses)) == 60
    assert len(read_allocations(str(tmp_path), "net")) == 60
