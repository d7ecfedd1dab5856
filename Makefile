# make book   : run the notebook suite (PROFILE=smoke by default) and build the HTML book in _build/html
# make test   : every test (unit, integration, nbval on the notebooks, the smoke suite and book build)
# make fast   : the fast tests only (not marked slow), on every core (pytest-xdist): quick feedback while editing
# make publish: push the built _build/html to the gh-pages branch of REMOTE (default origin); builds nothing
# make mutation: mutation score of the core modules (mutmut, fast tests; not in CI), see scripts/mutation_report.py
# Each bootstraps the virtual environment (VENV=.venv by default) from pyproject.toml.
VENV ?= .venv
PYTHON ?= python3
PROFILE ?= smoke
SET ?=
RUN_DIR ?=
REMOTE ?= origin
PY := $(VENV)/bin/python
# OpenMP threads that spin while waiting stall torch for seconds whenever the cores are shared.
export OMP_WAIT_POLICY ?= PASSIVE
# Progress bars refresh every 5 s in executed notebooks (the runner sets the same for its kernels).
notebooks: export TQDM_MININTERVAL ?= 5
STAMP := $(VENV)/.synthgap-installed

.PHONY: book test fast venv notebooks clean publish mutation

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

book: $(STAMP)
	$(PY) -m synthgap_helpers run --profile $(PROFILE) $(if $(RUN_DIR),--run-dir $(RUN_DIR)) $(foreach s,$(SET),--set $(s))

# nbval first, on a fresh runs/smoke (results of older code are never checked): it executes the committed
# notebooks into it on the exact CPU path (synthgap_helpers.exact); the suite-and-book test then reuses that run
# directory (every stage skips finished work), so the smoke suite is computed once per `make test`, and
# tests/test_smoke_reference.py checks its numbers. Where the exact path reproduces the committed outputs (Linux
# x86-64 with AVX2 and the reference's package versions: `python tests/smoke_reference.py tier`), nbval compares
# the marked cells exactly; elsewhere it masks their numbers, which the reference's bands check instead.
# Then the fast tests in parallel, then the slow ones in order (those that read runs/smoke are all slow).
test: $(STAMP)
	rm -rf runs/smoke
	tier=$$($(PY) tests/smoke_reference.py tier) && \
	$(PY) -m synthgap_helpers.exact $(PY) -m pytest --nbval-lax --nbval-sanitize-with tests/nbval_sanitize_$$tier.cfg \
		-p no:cacheprovider notebooks/
	$(PY) -m pytest -m "not slow" -n auto tests
	$(PY) -m pytest -m slow tests

# The tests not marked slow, in parallel (each test is independent of the others and of runs/smoke).
fast: $(STAMP)
	$(PY) -m pytest -m "not slow" -n auto -p no:cacheprovider tests

# Re-execute the committed notebooks in place, in order, on a fresh smoke run: their outputs are nbval's
# reference, so they must be what a clean clone computes (later chapters see the sets earlier ones made).
notebooks: $(STAMP)
	rm -rf runs/smoke
	cd notebooks && for nb in [0-9][0-9]_*.ipynb; do \
		$(abspath $(PY)) -m synthgap_helpers.exact $(abspath $(PY)) -m papermill --cwd . "$$nb" "$$nb" || exit 1; done

publish: $(STAMP)
	$(PY) -m synthgap_helpers publish --remote $(REMOTE)

clean:
	rm -rf _build book/executed runs/smoke

# Mutation testing of the core computations with their fast unit tests (mutmut 3, config in pyproject.toml
# [tool.mutmut]); not in CI: it takes about an hour on two cores. Prints the per-package scores at the end.
mutation: $(STAMP)
	$(PY) -m pip install --quiet 'mutmut>=3.8,<4'
	OMP_NUM_THREADS=1 $(VENV)/bin/mutmut run $$($(PY) scripts/mutation_report.py --scope) || true
	$(PY) scripts/mutation_report.py
