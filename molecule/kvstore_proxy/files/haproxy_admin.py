# -*- coding: utf-8 -*-
# Copyright: clustermesh.core contributors
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Ask HAProxy's admin socket (no socat needed) and print JSON.

haproxy_admin.py SOCKET servers BACKEND   {"<server>": "<status>", ...}  (UP, DOWN, "DOWN 1/2", ...)
haproxy_admin.py SOCKET info              {"Pid": "...", "Uptime_sec": "...", ...}
haproxy_admin.py SOCKET raw COMMAND...    {"output": "..."}
"""

import csv
import io
import json
import socket
import sys


def ask(path, command):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode()


def main(argv):
    path, what = argv[1], argv[2]
    if what == "servers":
        text = ask(path, "show stat").lstrip("# ")
        rows = csv.DictReader(io.StringIO(text))
        out = {r["svname"]: r["status"] for r in rows if r["pxname"] == argv[3] and r["svname"] != "BACKEND"}
    elif what == "info":
        out = {}
        for line in ask(path, "show info").splitlines():
            key, sep, value = line.partition(":")
            if sep:
                out[key.strip()] = value.strip()
    else:
        out = {"output": ask(path, " ".join(argv[3:]))}
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv)
