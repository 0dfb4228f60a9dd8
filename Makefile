# Two commands on a fresh machine with Python 3.11: `make quick` and `make test`.
# Each creates .venv and installs the package with what it needs on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The shared CIFAR copy beside the checkout when there is one; otherwise ./data (downloaded by torchvision).
HAR_DATA ?= $(if $(wildcard ../shared/data/cifar-10-batches-py),$(abspath ../shared/data),$(abspath data))
export HAR_DATA

.PHONY: install quick test test-pipeline clean reference-start reference-stop reference-status reference-save reference-tables

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test,pipeline]'
	touch $@

quick: install
	$(BIN)/snakemake --profile profiles/local --configfile config/quick.yaml

test: install
	$(BIN)/python -m pytest -q

# The whole-DAG tests (tiny runs through Snakemake, then edits that must retrain exactly what changed).
test-pipeline: install
	$(BIN)/python -m pytest -q -m pipeline

# The reference runs (config/reference.yaml; docs/reference.md): trained in the background in $(REFERENCE_DIR), a
# clone pinned at results/reference/TRAINING_COMMIT; saved into results/reference/ (commit it) before a session ends.
REFERENCE_DIR ?= $(abspath ..)/har-reference
export REFERENCE_DIR

reference-start: install
	bash workflow/reference.sh start

reference-stop:
	bash workflow/reference.sh stop

reference-status:
	bash workflow/reference.sh status

reference-save: install
	$(BIN)/python -m har.reference save --from $(REFERENCE_DIR)/code

# results/reference/tables and figures/reference from the finished runs in results/reference/runs (no training)
reference-tables: install
	$(BIN)/python -m har.reference rebuild

clean:
	rm -rf results/runs results/tsearch results/splits results/selection results/tables figures/*.png figures/*.pdf logs .pytest_cache
