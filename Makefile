# Two commands for a fresh machine (python3 with pip and venv):
#   make demo   set up .venv and run synth -> ingest -> stats -> plots on a demo corpus
#   make test   set up .venv and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo

.PHONY: demo test venv clean

$(BIN)/fastattn: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

venv: $(BIN)/fastattn

demo: venv
	rm -rf $(DEMO)
	$(BIN)/fastattn synth $(DEMO)/dumps --files 200 --layers 6 --heads 12 --seq 24-64 --batch 4 --seed 0
	$(BIN)/fastattn ingest $(DEMO)/dumps $(DEMO)/store.zarr
	$(BIN)/fastattn info $(DEMO)/store.zarr

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO)
