# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fedmeta-installed
# torch/torchvision pinned to the builds this machine provides from local disk.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: run test test-fast docs docs-results bench bench-default-run bench-peers bench-versions bench-local-round bench-floor bench-step bench-estimators bench-single-step bench-deploy bench-cluster venv clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# The optional integrations (TensorBoard, W&B, Optuna, Flower Datasets), which the test suite exercises.
EXTRAS_STAMP := $(VENV)/.fedmeta-extras-installed
$(EXTRAS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,extras]'
	touch $(EXTRAS_STAMP)

# The data set: found, installed (apt-get, as root or with password-less sudo) or downloaded;
# otherwise `make run` stops here with one message saying what to run (scripts/provision_data.py).
run: $(STAMP)
	$(PY) scripts/provision_data.py $(ARGS)
	$(PY) -m fedmeta.simulations.run $(ARGS)

# Both ends of the supported Flower range: the strategy and client unit tests under flwr 1.39 (the
# build/flwr139 venv, built once), then the whole suite under the main venv's flwr (1.42).
FLWR139_TESTS := tests/test_strategies.py tests/test_clients.py tests/test_screening.py tests/test_multiclient.py \
                 tests/test_checkpoint.py tests/test_fail_fast.py tests/test_flower_api.py tests/test_interop.py \
                 tests/test_dif_maml_flower.py

# The whole suite in TEST_JOBS pytest workers (pytest-xdist; the test machine has 2 cores, and about a third of
# the suite waits on processes, sockets and SuperNode polls). TEST_JOBS=1 runs it in one process.
TEST_JOBS   ?= 2
# A test whose worker process dies (exits or is killed mid-test; see README, "Which tests when") is run once more,
# at most once per suite, and listed under "rerun" (-rR); any other failure fails at once.
CRASH_RERUN := --reruns 1 --max-suite-reruns 1 --rerun-except . -rfER
PYTEST_ARGS ?= --durations=15 $(if $(filter 1,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist worksteal $(CRASH_RERUN))
FAST := not ray and not deploy and not subprocess and not flwr139

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "$(FAST)"

test: $(STAMP) $(EXTRAS_STAMP) docs
	$(PY) scripts/provision_data.py --optional
	$(PY) scripts/build_flwr_venv.py --flwr 1.39.0 --dest build/flwr139 > /dev/null
	build/flwr139/bin/python -m pytest -q -p no:cacheprovider -m "not ray and not deploy" $(FLWR139_TESTS)
	$(PY) -m pytest $(PYTEST_ARGS)

# The documentation site, built into site/ (open site/index.html) from mkdocs.yml and docs/; offline, and strict: a
# warning, a broken link or anchor, or a docstring reference that does not resolve fails it. The docs extra (MkDocs,
# Material, mkdocstrings) is installed into the venv once.
DOCS_STAMP := $(VENV)/.fedmeta-docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The tables in README.md, docs/ and bench/README.md, rewritten from the checked-in summaries they cite
# (scripts/docs_results.py; tests/test_docs_results.py fails when they differ).
docs-results: $(STAMP)
	$(PY) scripts/docs_results.py

bench: $(STAMP)
	$(PY) bench/bench_scale.py $(ARGS)

# The default experiment (make run) with one client per node and on multi-client nodes, side by side in one run.
bench-default-run: $(STAMP)
	$(PY) scripts/provision_data.py
	$(PY) bench/bench_default_run.py $(ARGS)

# fedmeta against pfl-research on one workload, side by side in one run; pfl's venv (build/pfl060) built on first use.
bench-peers: $(STAMP)
	$(PY) scripts/provision_data.py
	$(PY) bench/bench_peers.py $(ARGS)

# This checkout against an older commit (OLD=...), both versions' benchmarks interleaved in one run.
bench-versions: $(STAMP)
	$(PY) scripts/provision_data.py
	$(PY) bench/bench_versions.py $(OLD) $(ARGS)

bench-local-round: $(STAMP)
	$(PY) bench/bench_local_round.py $(ARGS)

# The hand-batched floor (plain bmm chains, one core) and fedmeta's vmapped node step, fast step and node round against it.
bench-floor: $(STAMP)
	$(PY) scripts/provision_data.py
	$(PY) bench/bench_floor.py $(ARGS)

bench-step: $(STAMP)
	$(PY) bench/bench_meta_step.py

bench-estimators: $(STAMP)
	$(PY) bench/bench_estimators.py $(ARGS)

bench-single-step: $(STAMP)
	$(PY) bench/bench_single_step.py

bench-deploy: $(STAMP)
	$(PY) bench/bench_deploy.py $(ARGS)

bench-cluster: $(STAMP)
	$(PY) bench/bench_cluster.py
	$(PY) bench/bench_memory_store.py --json bench/results/memory_store.json

clean:
	rm -rf $(VENV) results build *.egg-info

# flwr 1.39 (the last release whose SuperNodes talk gRPC) in its own venv, sharing torch & co. with
# $(VENV) through a .pth file; cached by a stamp (tests/test_deploy_grpc.py builds it when missing).
.PHONY: build/flwr139
build/flwr139: $(STAMP)
	$(PY) scripts/build_flwr_venv.py --flwr 1.39.0 --dest build/flwr139
