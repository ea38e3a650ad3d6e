"""Implementation of ``tools/lab``: lab hosts made of Linux namespaces (see docs/lab.md).

Modules:
  topology  -- load, validate and normalise a topology file (no root needed)
  state     -- where a lab keeps its state, how its namespaces are named
  hosts     -- build and tear down the namespaces, links and mounts
  inventory -- the Ansible inventory written for a lab
  cli       -- the command line (``up``, ``down``, ``status``, ``exec``, ``inventory``)
"""
