# fsseg: `make test` and `make demo` install into .venv first (pinned by constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-all demo lint bench-quick bench reproduce-table1 reproduce-table2 clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# two test processes, one torch thread each: the 2-core CI machine is used without oversubscription
TEST_ARGS ?= -n 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(TEST_ARGS)

test-all: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q $(TEST_ARGS) -m "not gpu"

demo: install
	$(VENV)/bin/fsseg demo

lint: install
	$(VENV)/bin/ruff check fsseg tests tools benchmarks
	$(VENV)/bin/ruff format --check fsseg tests tools benchmarks

# speed (benchmarks/speed.py, JSON in benchmarks/results/): the released DiffewS evaluation against fsseg's fp32 and
# bf16 paths and the training latent cache, at 256 px (a few minutes on a 2-core CPU); `bench` adds 512 px,
# predict-images, torch.compile and DiffSeg (long on a CPU). The last line printed is the summary.
bench-quick: install
	$(PY) benchmarks/speed.py --quick

bench: install
	$(PY) benchmarks/speed.py

# make reproduce-table1 DATA=<data root> CKPTS=<weights folder>   (SMOKE=1: embedded benchmark, tiny models, CPU;
# OVERWRITE=1: replace the table's earlier results, which are otherwise refused)
reproduce-table1 reproduce-table2: reproduce-%: install
	$(PY) -m fsseg.reproduce $* $(if $(SMOKE),--smoke) $(if $(OVERWRITE),--overwrite) --data "$(DATA)" --ckpts "$(CKPTS)"

clean:
	rm -rf $(VENV) runs reports .pytest_cache
