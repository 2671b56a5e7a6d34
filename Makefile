# postcopy: set-up, tests and the demo.  `make test` and `make demo` install everything they need
# on a fresh Debian 12 machine (apt packages as root or through sudo, then a virtualenv).
SHELL := /bin/bash
# nbdkit's python plugin embeds Debian's interpreter, so the venv is built from it.
PYTHON := /usr/bin/python3
VENV := .venv
VPY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_PACKAGES := nbdkit nbdkit-plugin-python qemu-utils libnbd-bin python3-libnbd fio nbd-server \
	python3-venv iproute2 qemu-system-x86 busybox-static cpio gcc libc6-dev \
	libvirt-clients libxml2-utils nbdkit-plugin-dev debootstrap \
	libvirt-daemon libvirt-daemon-driver-qemu python3-libvirt
PYTEST_ARGS ?=

.PHONY: all setup system-deps venv test test-xen lint typecheck demo bench clean

all: test

system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	  done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml | system-deps
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	@# setuptools' note on editable installs (a folder named like a package may shadow it) is
	@# informational, and here the folders are the packages: filtered so real warnings stand out.
	PYTHONWARNINGS="ignore:Editable installation" $(VPY) -m pip install -q -e '.[test]'
	touch $@

# The nbdkit filter that serves reads of present data in C (plugin/fastpath.c, installed with the
# package postcopy_plugin); postcopy receive looks for it in its interpreter's environment
# (sys.prefix/lib, i.e. .venv/lib) and runs without it when it is missing.
FASTPATH := $(VENV)/lib/postcopy-fastpath.so
$(FASTPATH): plugin/fastpath.c $(VENV)/.installed
	gcc -O2 -fPIC -shared -Wall -o $@ plugin/fastpath.c

venv: system-deps $(VENV)/.installed $(FASTPATH)

setup: venv

# The suite starts with the style checks: ruff and mypy must stay clean.  The nested Xen lab's
# tests take longer than the rest together: they run in `make test-xen`.
test: lint
	$(VPY) -m pytest -q -m "not xen" $(PYTEST_ARGS)

# The nested Xen lab (tests/kit/test_xenlab.py, marker `xen`): Xen 4.17 and a Debian dom0 in QEMU/TCG,
# built from Debian packages into the guest cache on first use (as root; nothing Xen is installed).
test-xen: venv
	$(VPY) -m pytest -q -m xen $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check nbdsrv postcopy plugin tests bench
	$(VENV)/bin/mypy

demo: venv
	$(VENV)/bin/postcopy demo

bench: venv
	$(VPY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
