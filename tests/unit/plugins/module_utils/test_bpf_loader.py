# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""bpf_loader: build errors name the fix; lb.o has one section per program; libbpf struct sizes."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

from ansible_collections.clustermesh.core.plugins.module_utils import bpf_loader as bl

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))


def test_missing_tools_and_objects_are_named(tmp_path):
    with pytest.raises(bl.LoaderError, match=r"no-such-clang not found: install the Debian package clang"):
        bl.build(os.path.join(REPO, "bpf"), str(tmp_path), clang="no-such-clang")
    with pytest.raises(bl.LoaderError, match=r"lb.o does not exist: build it first \(make bpf"):
        bl.load(str(tmp_path / "lb.o"), pin_root=str(tmp_path / "pins"))
    assert not (tmp_path / "pins").exists()  # nothing made before the error


def test_libbpf_option_structs_match_libbpf_1x():
    # sizes libbpf checks through opts->sz (x86_64 / aarch64)
    assert ctypes.sizeof(bl._OpenOpts) == 80  # pylint: disable=protected-access
    assert ctypes.sizeof(bl._TcHook) == 24  # pylint: disable=protected-access
    assert ctypes.sizeof(bl._TcOpts) == 32  # pylint: disable=protected-access


@pytest.mark.skipif(not (shutil.which("clang") and shutil.which("bpftool")), reason="needs clang and bpftool")
def test_build_makes_one_section_per_program(tmp_path):
    obj = bl.build(os.path.join(REPO, "bpf"), str(tmp_path))
    sections = subprocess.run(["llvm-objdump", "-h", obj], capture_output=True, text=True, check=False).stdout
    if not sections:
        pytest.skip("llvm-objdump is missing")
    assert "tc/from_pod" in sections and "tc/to_pod" in sections and ".maps" in sections
    # a compiler error comes back with clang's message
    bad = tmp_path / "src"
    shutil.copytree(os.path.join(REPO, "bpf"), bad, ignore=shutil.ignore_patterns("build"))
    (bad / "lb.c").write_text("int broken(;\n")
    with pytest.raises(bl.LoaderError, match=r"clang failed to build .*lb.c:\n.*error"):
        bl.build(str(bad), str(tmp_path))
