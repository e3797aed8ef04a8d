# The README's commands, for hosts that have make (lbctl/setup.sh installs it too).
.PHONY: setup demo test test-unit test-bpf test-netns lint clean-lab bench \
	vagrant-box vagrant-up vagrant-demo vagrant-destroy

VENV := .venv
PY := $(VENV)/bin/python

setup:
	bash lbctl/setup.sh

demo:
	bash lbctl/setup.sh demo

test:
	bash lbctl/setup.sh test

test-unit: setup
	$(PY) -m pytest tests/unit -q

test-bpf: setup
	$(PY) -m pytest tests/bpf -q

test-netns: setup
	$(PY) -m pytest tests/netns -q

lint: setup
	$(PY) -m ruff check xdp lbctl tests

clean-lab: setup
	-$(VENV)/bin/lbctl -n lbl-lb detach --all --purge
	$(VENV)/bin/lbctl lab down

bench: setup
	bash lbctl/bench-setup.sh
	mkdir -p bench/results
	$(PY) -m lbctl bench dataplane --json bench/results/dataplane-$$(date -u +%Y%m%dT%H%M%SZ).json
	$(PY) -m lbctl bench peers --results-dir bench/results --doc docs/benchmarks.md
	$(PY) -m lbctl bench l7 --results-dir bench/results --doc docs/benchmarks.md
	$(PY) -m lbctl bench agent --json bench/results/agent-$$(date -u +%Y%m%dT%H%M%SZ).json --plot docs/agent-bench.png

# The Vagrant lab (vagrant/README.md): five VMs on libvirt. LBCTL_BOX=lbctl/bookworm64 uses
# the box vagrant/build-box.sh builds here instead of Vagrant Cloud's debian/bookworm64.
vagrant-box:
	bash vagrant/lab.sh host
	bash vagrant/build-box.sh

vagrant-up:
	bash vagrant/lab.sh up

vagrant-demo:
	bash vagrant/run-demo.sh

vagrant-destroy:
	bash vagrant/lab.sh destroy
