"""Bytecode cache for modules imported from zip files, loaded by every Python in tools/vm-run's VM.

Ansible runs each module from a zip (AnsiballZ), whose sources Python compiles at every run: under the
VM's emulated CPU that is a sixth of a module run (seconds), for the same few files each time. This
keeps the compiled code of each source, by its content, in a tmpfs directory of the VM; the code is
the one ``compile()`` gives for that source, so modules behave the same. Only the file names in its
tracebacks may name another run's temporary directory. Never installed outside the VM (vm-run puts it
into the VM's Python image only: docs/vm-lab.md).
"""

import marshal
import os
import zipimport

CACHE_DIR = "/run/vm-run/zipimport-cache"
_compile_source = zipimport._compile_source


def _cached_compile_source(pathname, source):
    # the path inside the zip is part of the key: the same text in two modules keeps its own file name
    import hashlib  # here, not at every Python's start

    inner = pathname.rsplit(".zip" + os.sep, 1)[-1]
    key = hashlib.sha256(inner.encode() + b"\0" + source).hexdigest()
    path = os.path.join(CACHE_DIR, key)
    try:
        with open(path, "rb") as f:
            return marshal.load(f)
    except (OSError, EOFError, ValueError, TypeError):
        pass
    code = _compile_source(pathname, source)
    try:
        os.makedirs(CACHE_DIR, exist_ok=True)
        partial = "%s.%d" % (path, os.getpid())
        with open(partial, "wb") as f:
            marshal.dump(code, f)
        os.rename(partial, path)
    except OSError:
        pass  # not writable here: compile next time too
    return code


zipimport._compile_source = _cached_compile_source
