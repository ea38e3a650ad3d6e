"""node_bundle: the library as one deterministic, runnable zipapp."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import pytest

from ansible_collections.clustermesh.core.plugins.action.node_bundle import PACKAGE, build_bundle, library_files


def _zip(data):
    return zipfile.ZipFile(io.BytesIO(data[data.index(b"\n") + 1 :]))


def test_the_same_code_gives_the_same_bytes():
    assert build_bundle("cni", "/usr/bin/python3") == build_bundle("cni", "/usr/bin/python3")


def test_layout_shebang_and_entries(tmp_path):
    data = build_bundle("cni", "/opt/venv/bin/python")
    assert data.startswith(b"#!/opt/venv/bin/python\n")
    names = _zip(data).namelist()
    assert names == sorted(names)
    assert "__main__.py" in names and PACKAGE + "/__init__.py" in names
    assert PACKAGE + "/cni_plugin.py" in names and PACKAGE + "/ipam.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert {i.date_time for i in _zip(data).infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert len(names) == len(library_files()) + 2


def test_nested_directories_become_packages(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "cni_plugin.py").write_text("def main():\n    return 0\n")
    (tmp_path / "sub" / "x.py").write_text("")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "cni_plugin.cpython-311.pyc").write_bytes(b"")
    names = _zip(build_bundle("cni", "/usr/bin/python3", source_dir=str(tmp_path))).namelist()
    assert names == [
        "__main__.py",
        PACKAGE + "/__init__.py",
        PACKAGE + "/cni_plugin.py",
        PACKAGE + "/sub/__init__.py",
        PACKAGE + "/sub/x.py",
    ]


def test_it_runs_the_cni_plugin(tmp_path):
    path = tmp_path / "clustermesh-cni"
    path.write_bytes(build_bundle("cni", sys.executable))
    os.chmod(path, 0o755)
    proc = subprocess.run(
        [str(path)],
        input=b'{"cniVersion": "1.0.0"}',
        env={"CNI_COMMAND": "VERSION", "PATH": os.environ.get("PATH", "")},
        capture_output=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["supportedVersions"] == ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]


@pytest.mark.parametrize(
    "entry, interpreter, error",
    [
        ("agent", "/usr/bin/python3", "entry_point 'agent': must be one of cni"),
        ("cni", "python3", "must be an absolute path"),
        ("cni", "/usr/bin/python3\n", "must be an absolute path"),
    ],
)
def test_bad_options(entry, interpreter, error):
    with pytest.raises(ValueError, match=error):
        build_bundle(entry, interpreter)
