# Both targets do all set-up on a fresh Debian machine, then run.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bytecode lint clean

$(STAMP): pyproject.toml setup.py kvmstub/_sevcrypto.c
	@if ! [ -e /usr/include/sys/capability.h ]; then \
		echo "installing libcap-dev (python-prctl builds against it)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libcap-dev; \
	fi
	@if ! command -v cc > /dev/null; then \
		echo "installing gcc (python-prctl and kvmstub's native crypto are C)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc; \
	fi
	@if ! [ -e /usr/include/openssl/evp.h ]; then \
		echo "installing libssl-dev (kvmstub's native SEV crypto builds against it)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev; \
	fi
	@[ -x $(PY) ] || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

# Every VMM is a new Python process (a handoff starts one): with bytecode compiled, as an
# installed package has it, none compiles our modules at start (50 ms or more where
# PYTHONDONTWRITEBYTECODE is set, which leaves it to this step).
bytecode: $(STAMP)
	@$(PY) -m compileall -q guestprog kvmstub handoff > /dev/null

demo: $(STAMP) bytecode
	$(VENV)/bin/handoff demo

lint: $(STAMP)
	$(VENV)/bin/ruff check guestprog kvmstub handoff tests tools
	$(VENV)/bin/ruff format --check guestprog kvmstub handoff tests tools
	$(VENV)/bin/mypy guestprog kvmstub handoff
	$(VENV)/bin/lint-imports --no-cache

test: $(STAMP) bytecode lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache build kvmstub/_sevcrypto*.so
