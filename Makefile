# Two commands for a fresh machine (python3 with pip and venv):
#   make demo   set up .venv and run synth -> ingest -> stats -> plots -> report on a demo corpus
#   make test   set up .venv (with the dev, torch and compat extras) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= demo
# torch first and pinned: 2.13.0 is the CPU build this project is tested with; a bare
# `torch` requirement would pull a CUDA build of several GB.
TORCH  ?= torch==2.13.0

.PHONY: demo test venv venv-torch clean

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.torch: $(VENV)/.base
	$(BIN)/pip install --quiet '$(TORCH)'
	$(BIN)/pip install --quiet -e '.[dev,capture-test,compat]'
	touch $@

venv: $(VENV)/.base
venv-torch: $(VENV)/.torch

demo: venv
	rm -rf $(DEMO)
	$(BIN)/fastattn synth $(DEMO)/dumps --files 200 --layers 6 --heads 12 --seq 24-64 --batch 4 --seed 0
	$(BIN)/fastattn ingest $(DEMO)/dumps $(DEMO)/store.zarr
	$(BIN)/fastattn info $(DEMO)/store.zarr
	$(BIN)/fastattn stats $(DEMO)/store.zarr
	$(BIN)/fastattn plot $(DEMO)/store.zarr overview --batch 0 --layer 0 -o $(DEMO)/overview.png
	$(BIN)/fastattn plot $(DEMO)/store.zarr layers --batch 0 -o $(DEMO)/layers.png
	$(BIN)/fastattn plot $(DEMO)/store.zarr heads --batch 0 --layer 0 -o $(DEMO)/heads.png
	$(BIN)/fastattn plot $(DEMO)/store.zarr batches --layer 0 -o $(DEMO)/batches.png
	$(BIN)/fastattn plot $(DEMO)/store.zarr entropy -o $(DEMO)/entropy.png
	$(BIN)/fastattn report $(DEMO)/store.zarr -o $(DEMO)/report.html
	@echo "demo done: figures and report.html in $(DEMO)/"

test: venv-torch
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO)
