# The two commands: `make run` and `make test`. Both set everything up from a bare python3.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Server options for `make run`; override on the command line: make run PORT=7000
HOST ?= 127.0.0.1
PORT ?= 7117
DB   ?= selchat.db

.PHONY: run test test-random test-slow bench bench-quick venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.py selchat/_version.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/selchat serve --host $(HOST) --port $(PORT) --db $(DB)

# In file order (pytest-randomly off); `make test-random` shuffles the order
# (a new seed each run, printed first; SEED=N repeats one).
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:randomly tests

test-random: $(STAMP)
	@seed=$${SEED:-$$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')}; \
	echo "tests in random order, seed $$seed (make test-random SEED=$$seed repeats it)"; \
	$(BIN)/python -m pytest -q -p randomly --randomly-seed=$$seed tests

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow --run-slow tests

# The standard matrix of docs/performance.md (about 4-5 minutes), with the
# asyncio baseline measured in the same run.
bench: $(STAMP)
	$(BIN)/selchat bench --matrix standard --save bench-results.json

bench-quick: $(STAMP)
	$(BIN)/selchat bench --matrix quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
