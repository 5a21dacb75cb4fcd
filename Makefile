# The two commands: `make up` runs the fabric, `make test` runs the tests.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: up test install proto bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/tierflow up $(ARGS)

# The suite waits on processes far more than it computes (one core busy on average), so
# it runs on TEST_WORKERS pytest-xdist workers, a test file per worker at a time.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(ARGS)

# Regenerate the gRPC stubs from proto/ (they are committed, generated with grpcio-tools
# pinned to the grpcio runtime in pyproject.toml).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto \
	  --grpc_python_out=proto proto/tierflow/v1/*.proto

bench: $(STAMP)
	$(BIN)/python loadtest/http_layer.py

clean:
	rm -rf $(VENV) .tierflow .pytest_cache
