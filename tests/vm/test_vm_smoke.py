"""The VM runner end to end: inside tools/vm-run's VM, the kernel loads esp4, a lab of two hosts
comes up, and an ESP tunnel between their underlay addresses (set with `ip xfrm` here, only for
this test) carries a ping: the capture on the underlay (the lab fabric's bridge) shows ESP (IP
protocol 50) both ways, no ICMP, and not the ping's payload pattern in clear.
"""

from __future__ import annotations

import os
import re

from .vmtools import capture, vm_lab

PREFIX = "cmvm"
TOPOLOGY = {
    "segments": [{"name": "dc1", "cidr": "198.18.1.0/24"}],
    "hosts": [{"name": "a", "segment": "dc1"}, {"name": "b", "segment": "dc1"}],
}
# test-only keys: rfc4106(gcm(aes)) = 16-byte AES key + 4-byte salt, ICV 128 bits
KEY_AB = "0x" + "11" * 20
KEY_BA = "0x" + "22" * 20
PATTERN = "c0ffee5eedc0ffee"  # ping -p: 16 pattern bytes repeated in every echo payload


def esp_tunnel(lab, a, b):
    """Tunnel-mode ESP between the underlay addresses of lab hosts a and b (both directions)."""
    ip_a, ip_b = lab.addresses[a], lab.addresses[b]
    for host, local, remote in ((a, ip_a, ip_b), (b, ip_b, ip_a)):
        for src, dst, spi, key in ((ip_a, ip_b, "0x100", KEY_AB), (ip_b, ip_a, "0x200", KEY_BA)):
            lab.exec(host, "ip", "xfrm", "state", "add", "src", src, "dst", dst, "proto", "esp", "spi", spi,
                     "reqid", "7", "mode", "tunnel", "aead", "rfc4106(gcm(aes))", key, "128")  # fmt: skip
        for direction, src, dst in (("out", local, remote), ("in", remote, local)):
            lab.exec(host, "ip", "xfrm", "policy", "add", "src", src + "/32", "dst", dst + "/32", "dir", direction,
                     "tmpl", "src", src, "dst", dst, "proto", "esp", "reqid", "7", "mode", "tunnel")  # fmt: skip


def test_kernel_has_esp():
    with open("/proc/modules") as f:
        assert any(line.split()[0] == "esp4" for line in f), "esp4 is not loaded in the VM"


def test_esp_tunnel_carries_ping_and_hides_it_on_the_underlay(vm):
    with vm_lab(PREFIX, TOPOLOGY) as lab:
        assert sorted(lab.addresses) == ["a", "b"]
        ip_b = lab.addresses["b"]
        esp_tunnel(lab, "a", "b")
        # on the wire: the fabric's bridge (in a host, eth0 also shows the decrypted inbound packets)
        with capture(PREFIX, "fabric", "br-dc1", "host %s" % ip_b, seconds=120, name="smoke-esp.pcap") as cap:
            ping = lab.exec("a", "ping", "-c", "3", "-i", "0.2", "-W", "5", "-p", PATTERN, ip_b, check=False)
        assert ping.returncode == 0, "ping through the ESP tunnel failed:\n%s%s" % (ping.stdout, ping.stderr)
        assert cap.path.startswith(vm) and os.path.getsize(cap.path) > 24
        packets = cap.packets()
        ip_a = lab.addresses["a"]
        esp = [p for p in packets if p.proto == 50]
        assert {(p.src, p.dst) for p in esp} == {(ip_a, ip_b), (ip_b, ip_a)}, "no ESP both ways: %s" % packets
        assert [p for p in packets if p.proto == 1] == [], "ICMP in clear on the underlay"
        pattern = bytes.fromhex(PATTERN)
        assert not any(pattern in p.frame for p in packets), "the ping payload shows in clear"
        # the SPIs are the ones set above: the first 4 bytes of the ESP header
        assert {p.payload[:4].hex() for p in esp} == {"00000100", "00000200"}
        # and the tunnel really decrypts: b counted on its inbound state at least the requests a captured
        state = lab.exec("b", "ip", "-s", "xfrm", "state", "get", "src", ip_a, "dst", ip_b, "proto", "esp",
                         "spi", "0x100").stdout  # fmt: skip
        counted = re.search(r"(\d+)\(packets\)", state)
        sent = len([p for p in esp if p.dst == ip_b])
        assert counted and int(counted.group(1)) >= sent, (sent, state)
