"""Tests that run inside the VM of tools/vm-run (a Debian kernel with ESP): `tools/run-tests vm`."""
