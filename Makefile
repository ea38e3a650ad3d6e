# clustermesh.core — the two commands: `make demo` and `make test` (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
BIN       := $(CURDIR)/$(VENV)/bin
VERSION   := $(shell sed -n 's/^version: *//p' galaxy.yml)
TARBALL   := build/clustermesh-core-$(VERSION).tar.gz
LAB       := tools/lab
LAB_PREFIX ?= cml
INVENTORY  = /run/clustermesh-lab/$(LAB_PREFIX)/inventory/hosts.yml

export PATH := $(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/build/collections
export ANSIBLE_FORCE_COLOR := 0

.PHONY: help deps collection demo demo-down lab-up lab-down test lint sanity units lab-tests molecule bench bench-datapath bench-agent bench-services bench-policy bench-ipsec vm-tests bpf clean

help:
	@echo "make demo       install what is needed, build the lab, run playbooks/site.yml against it"
	@echo "make demo-down  tear the demo lab down"
	@echo "make test       install what is needed and run every test (lint, sanity, units, lab, molecule)"
	@echo "make bench      run the benchmarks (results in bench/results/)"
	@echo "make bench-datapath  pod-to-pod throughput and latency per routing mode (bench/results/datapath.json)"
	@echo "make bench-agent     meshd convergence and 5,000-service scale (bench/results/agent.json)"
	@echo "make bench-services  ClusterIP (bpf/lb.c) vs pod IP and vs nftables DNAT (bench/results/services_datapath.json)"
	@echo "make bench-policy    1,000 policy rules vs none, agent recompute CPU, policy convergence (bench/results/policy.json)"
	@echo "make bench-ipsec     50-node IPsec plan counts and apply time; throughput with/without IPsec in the VM (bench/results/ipsec.json)"
	@echo "make vm-tests        the tests that need a kernel with ESP, in a virtme-ng VM (tests/vm, docs/vm-lab.md)"

deps:
	@tools/install-deps

# Build the collection tarball and install it where ansible.cfg looks (build/collections).
collection: deps
	@mkdir -p build
	@$(BIN)/ansible-galaxy collection build --force --output-path build . >/dev/null
	@$(BIN)/ansible-galaxy collection install --force -p build/collections $(TARBALL) >/dev/null
	@echo "collection: installed clustermesh.core $(VERSION) into build/collections"

lab-up: deps
	@$(LAB) up --prefix $(LAB_PREFIX)

lab-down:
	@$(LAB) down --prefix $(LAB_PREFIX)

demo: collection lab-up
	$(BIN)/ansible-playbook -i $(INVENTORY) playbooks/site.yml
	$(BIN)/ansible-playbook -i $(INVENTORY) playbooks/status.yml
	$(BIN)/ansible-playbook -i $(INVENTORY) playbooks/connectivity.yml -e connectivity_report=$(CURDIR)/build/connectivity.json
	$(BIN)/ansible-playbook -i $(INVENTORY) playbooks/policy_demo.yml -e connectivity_report=$(CURDIR)/build/connectivity-policy.json

demo-down: lab-down

test: collection
	@tools/run-tests

lint: deps
	@tools/run-tests lint

sanity: deps
	@tools/run-tests sanity

units: deps
	@tools/run-tests units

lab-tests: collection
	@tools/run-tests lab

molecule: collection
	@tools/run-tests molecule

vm-tests: collection
	@tools/run-tests vm

# Benchmarks: side-by-side ratios, medians of several rounds, results in bench/results/*.json.
BENCH_ROUNDS ?= 3
bench: collection
	$(BIN)/python bench/control_plane.py --rounds $(BENCH_ROUNDS)
	$(BIN)/python bench/datapath.py --rounds $(BENCH_ROUNDS)
	$(BIN)/python bench/services_datapath.py --rounds $(BENCH_ROUNDS)
	$(BIN)/python bench/agent.py --rounds $(BENCH_ROUNDS)
	$(BIN)/python bench/policy.py --rounds $(BENCH_ROUNDS)
	$(BIN)/python bench/ipsec.py --rounds $(BENCH_ROUNDS) --all

# Pod-to-pod throughput and latency per routing mode against plain routing (issue 4), ~9 minutes.
bench-datapath: collection
	$(BIN)/python bench/datapath.py --rounds $(BENCH_ROUNDS)

# The tc datapath (bpf/lb.c) against this kernel's BTF, into build/bpf (issue 5 groundwork).
bpf:
	@$(MAKE) -C bpf OUT=$(CURDIR)/build/bpf

clean:
	rm -rf build tests/output

# meshd: remote change -> BPF map convergence and the 5,000-service scale (issue 5), ~3 minutes.
bench-agent: collection
	$(BIN)/python bench/agent.py --rounds $(BENCH_ROUNDS)

# The ClusterIP datapath against pod IP and an nftables DNAT of the same service (issue 5), ~3 minutes.
bench-services: collection
	$(BIN)/python bench/services_datapath.py --rounds $(BENCH_ROUNDS)

# Network policy (issue 6): datapath with 1,000 rules vs none, agent recompute CPU, remote identity -> allowed; ~3-9 minutes.
bench-policy: collection
	$(BIN)/python bench/policy.py --rounds $(BENCH_ROUNDS)

# IPsec (issue 7): a planned 50-node mesh (counts, plan and policy apply time, here), throughput with and
# without IPsec and state apply time in the VM of tools/vm-run (ESP); ~10 minutes.
bench-ipsec: collection
	$(BIN)/python bench/ipsec.py --rounds $(BENCH_ROUNDS) --all
