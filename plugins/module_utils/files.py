# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Writing the project's files: atomically, with the mode set before any content lands."""

from __future__ import annotations

import os
import tempfile


def read_bytes(path):
    """The file's bytes, or None when it does not exist."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


def file_mode(path):
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return None


def write_atomic(path, data, mode):
    """Temp file in the same directory (created with ``mode``), fsync, rename over ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def file_differs(path, data, mode):
    """What would change: None, 'content' or 'mode'."""
    if read_bytes(path) != data:
        return "content"
    if file_mode(path) != mode:
        return "mode"
    return None


def ensure_file(path, data, mode):
    """Make ``path`` hold ``data`` with ``mode``; return True when something changed."""
    change = file_differs(path, data, mode)
    if change == "content":
        write_atomic(path, data, mode)
    elif change == "mode":
        os.chmod(path, mode)
    return change is not None


def ensure_dir(path, mode):
    """Create ``path`` (and parents) with ``mode``; fix the mode of an existing one. True if changed."""
    if os.path.isdir(path):
        if file_mode(path) != mode:
            os.chmod(path, mode)
            return True
        return False
    os.makedirs(path, mode=mode, exist_ok=True)
    os.chmod(path, mode)
    return True
