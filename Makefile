# cevpn — two commands on a fresh Debian 12 machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
YANGDIR := yang
IETF    := $(VENV)/share/yang/modules
MODULES := $(YANGDIR)/cevpn-types.yang $(YANGDIR)/cevpn-ce.yang $(YANGDIR)/cevpn-service.yang

.PHONY: all deps venv docs bindings lint lint-yang test unit demo demo-ha clean

all: test

deps:
	@tools/install-debian-packages

$(VENV)/.stamp: pyproject.toml $(wildcard packaging/debian/*.txt) | deps
	@test -x $(VPY) || $(PY) -m venv $(VENV)
	@$(VPY) -m pip install -q --upgrade pip
	@$(VPY) -m pip install -q -e '.[dev]'
	@# pyangbind declares enum34, which breaks Python 3.11: install it without dependencies.
	@$(VPY) -m pip install -q --no-deps pyangbind==0.8.7
	@touch $@

venv: deps $(VENV)/.stamp

# The generated bindings are committed; tests/test_bindings.py fails when they are stale.
docs: venv
	@$(VPY) tools/gen_model_docs.py

bindings: venv
	@$(VPY) tools/gen_bindings.py

lint-yang: venv
	@$(VPY) tools/lint_yang.py

lint: lint-yang
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy

# The lab's tests one at a time (one User-Mode Linux lab at a time), then everything
# else two at a time: most of those wait on servers and agents, not on the CPU.
# Both halves always run; make fails if either did.
test: venv lint
	@rc=0; \
	$(VPY) -m pytest -m lab || rc=$$?; \
	$(VPY) -m pytest -m "not lab" -n 2 --dist worksteal || rc=$$?; \
	exit $$rc

# Every test that needs no lab, four at a time (most wait on servers, not the CPU);
# worksteal rebalances the long tail (141 s against 171 s with --dist load, here).
unit: venv
	@$(VPY) -m pytest -m "not lab" -n 4 --dist worksteal

demo: venv
	@$(VPY) tools/demo.py

# Two servers and a primary + synchronous standby PostgreSQL on this machine (no lab):
# a server and then the primary database are killed; nothing acknowledged is lost.
demo-ha: venv
	@$(VPY) tools/demo_ha.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build dist cevpn.egg-info
