# The two commands: `make run` and `make test`. Both set everything up from a bare python3.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Server options for `make run`; override on the command line: make run PORT=7000
HOST ?= 127.0.0.1
PORT ?= 7117
DB   ?= selchat.db

.PHONY: run test test-random test-slow bench bench-quick bench-cluster venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py selchat/_version.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	@echo "in another terminal: $(BIN)/selchat connect --host $(HOST) --port $(PORT) --register --user NAME"
	@echo "(--register the first time; Ctrl-C here stops the server)"
	$(BIN)/selchat serve --host $(HOST) --port $(PORT) --db $(DB)

# The suite mostly waits on real timers (leases, resume windows), so it runs
# in JOBS processes (pytest-xdist, a test file to a process), then the tests
# marked serial alone: they time latencies, or load every core. JOBS=0: all
# in one process. In file order (pytest-randomly off); `make test-random`
# shuffles the order (a new seed each run, printed first; SEED=N repeats one).
JOBS   ?= 2
PYTEST := $(BIN)/python -m pytest -q -rs
test: $(STAMP)
	$(PYTEST) -p no:randomly -n $(JOBS) --dist loadfile -m "not serial" tests
	$(PYTEST) -p no:randomly -m serial tests

test-random: $(STAMP)
	@seed=$${SEED:-$$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')}; \
	echo "tests in random order, seed $$seed (make test-random SEED=$$seed repeats it)"; \
	$(PYTEST) -p randomly --randomly-seed=$$seed -n $(JOBS) --dist loadfile -m "not serial" tests && \
	$(PYTEST) -p randomly --randomly-seed=$$seed -m serial tests

test-slow: $(STAMP)
	$(PYTEST) -m slow --run-slow tests

# The standard matrix of docs/performance.md (about 6 minutes), with the
# asyncio baseline measured in the same run.
bench: $(STAMP)
	$(BIN)/selchat bench --matrix standard --save bench-results.json

bench-quick: $(STAMP)
	$(BIN)/selchat bench --matrix quick

# Users chatting across a cluster of 2 nodes on one redis-server (started by
# the bench; needs redis-server), beside one node (docs/performance.md,
# "Cluster"): 100 pairs at 1 and at 32 in flight, then one pair at 1 in
# flight (latency without queueing). About 3 minutes.
bench-cluster: $(STAMP)
	@pin=$$([ $$(nproc) -ge 2 ] && echo --pin); set -e; \
	for args in "--pairs 100 --window 1" "--pairs 100 --window 32" "--pairs 1 --window 1"; do \
		echo "$(BIN)/selchat bench $$pin --cluster 2 $$args"; \
		$(BIN)/selchat bench $$pin --cluster 2 $$args; echo; \
	done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
