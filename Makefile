# Two commands on a fresh machine:  make demo   and   make test
# Both create .venv if missing and install the project into it.
#
# Without a GPU, torch's CPU build is installed first (TORCH_CPU). On this
# project's machines `torch==2.13.0` resolves to a CPU wheel on local disk; elsewhere
# use e.g.  make test TORCH_CPU="torch --index-url https://download.pytorch.org/whl/cpu"

PYTHON    ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
TORCH_CPU ?= torch==2.13.0
STAMP     := $(VENV)/.clair-installed

.PHONY: install demo test docs lint experiment samples bench bench-threads merge-quality attack-bench clean install-flower test-flower fl-experiment

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU present: installing torch as pyproject.toml asks"; \
	elif ! $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
		echo "No GPU: installing torch CPU build ($(TORCH_CPU))"; \
		$(BIN)/python -m pip install -q $(TORCH_CPU); \
	fi
	$(BIN)/python -m pip install -q -e ".[dev,plot]"
	@touch $@

install: $(STAMP)

demo: install
	$(BIN)/clair audit sample_adapters --exit-zero

# The whole suite in .venv, then ClairStrategy's CI simulation, examples/flower-app under
# `flwr run` and the CLI's tests in .venv-flower (Flower's older Typer and Rich), so CI runs
# the Flower tests too: CLAIR_REQUIRE_FLOWER=1 makes a missing flwr or Ray an error there,
# not a skip.
#
# The tests run in TEST_JOBS worker processes (pytest-xdist; auto: one per CPU; TEST_JOBS=0 runs
# them in this process), each test file in one worker (its module fixtures built once). Most of
# the suite's time is CLI subprocesses starting Python and torch, which the workers overlap. The
# Flower simulations and the Ray executor's tests start local Ray clusters: those run one at a time.
TEST_JOBS ?= auto
PYTEST_JOBS = -n $(TEST_JOBS) --dist loadfile

test: install install-flower
	$(BIN)/python -m pytest -q $(PYTEST_JOBS)
	$(FLOWER_PYTEST) $(PYTEST_JOBS) $(FLOWER_CLI_TESTS)
	$(FLOWER_PYTEST) $(FLOWER_RAY_TESTS)

# The documentation site (mkdocs.yml, docs/): the docs extra into .venv, then a strict build into
# site/ (a broken link or anchor, or a page missing from the nav, fails it). The command
# reference page is generated from the Typer app at build time (docs/hooks/cli_reference.py).
STAMP_DOCS := $(VENV)/.clair-docs-installed

$(STAMP_DOCS): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e ".[docs]"
	@touch $@

docs: $(STAMP_DOCS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/python -m mkdocs build --strict --site-dir site

lint: install
	$(BIN)/ruff check clair_cli tests experiments benchmarks fuzz examples
	$(BIN)/ruff format --check clair_cli tests experiments benchmarks fuzz examples
	$(BIN)/mypy clair_cli

# The paper's text-copying experiment: trains the LoRA clients for 3 seeds (about 4 min a
# seed on 2 cores), prints and writes the tables (experiments/text_copy/results/), then scores
# every method on the committed sample_adapters/. It does not rewrite sample_adapters/:
# training differs between CPUs, so a pool trained elsewhere would not match the tests'
# expectations; `make samples` rewrites it from seed 0 on purpose.
experiment: install
	$(BIN)/python -m experiments.text_copy --out experiments/text_copy/results
	$(BIN)/python -m experiments.text_copy --out experiments/text_copy/results --score-samples sample_adapters

samples: install
	$(BIN)/python -m experiments.text_copy --out $${TMPDIR:-/tmp}/clair-samples-run --seeds 0 --samples sample_adapters

# Performance suite (not part of make test): generates a Llama-2-7B-shaped pool of 64 bf16
# adapters (2.1 GB, in $$TMPDIR/clair-bench), times clair against the I/O floor, a dense
# decomposition and PEFT's merges, and writes benchmarks/results/ (about 25 min on 2 cores).
bench: install
	$(BIN)/python -m benchmarks.perf $(BENCH_ARGS)

# clair audit on an idle and on a busy machine (a CPU hog per core) under four thread settings
# (about 19 minutes on 2 cores); the table is in docs/benchmarks/performance.md.
bench-threads: install
	$(BIN)/python -m benchmarks.threads

# Merge quality on trained pools of two other tasks, 3 seeds (not part of make test): pools
# generated once into $$TMPDIR/clair-trained-pools (about 4 min), then every merge method run
# through the CLI and scored (about 10 min on 2 cores); writes benchmarks/results/merge_quality.json.
merge-quality: install
	$(BIN)/python -m benchmarks.merge_quality

# Attack benchmark on the same trained pools (not part of make test): ALIE, IPM, Min-Max/Min-Sum,
# Fang's attacks, constrain-and-scale backdoors, factor games and copies at 20 % and 33 %
# attackers, each scanned in strength; clair's merge against the oracle and Flower's / ByzFL's
# robust aggregators (about 25 min on 2 cores); writes benchmarks/results/attacks.{json,md}.
# A smoke run: python -m benchmarks.attacks --quick --seeds 1 --tasks majority
attack-bench: install
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN)/python -m benchmarks.attacks --rounds 4 $(ATTACK_ARGS)

# Flower (clair-lora[flower,flower-sim]) lives in its own venv: Flower pins older Typer and Rich than clair's
# default install, and those pins must not leak into .venv.
VENV_FLOWER  ?= .venv-flower
BIN_FLOWER   := $(VENV_FLOWER)/bin
STAMP_FLOWER := $(VENV_FLOWER)/.clair-installed

$(STAMP_FLOWER): pyproject.toml Makefile
	@test -x $(BIN_FLOWER)/python || $(PYTHON) -m venv $(VENV_FLOWER)
	@if ! $(BIN_FLOWER)/python -c "import torch" >/dev/null 2>&1; then \
		$(BIN_FLOWER)/python -m pip install -q $(TORCH_CPU); \
	fi
	$(BIN_FLOWER)/python -m pip install -q -e ".[dev,plot,flower,flower-sim]"
	@touch $@

install-flower: $(STAMP_FLOWER)

# ClairStrategy's tests (a 3-round simulation, about 20 s), examples/flower-app run by `flwr run`
# on a local simulation SuperLink with Ray (8 SuperNodes, 4 rounds, about 2 min on 2 busy
# cores), the in-memory engine path, the CLI's tests under Flower's older Typer and Rich, and
# --executor ray on the Ray that flwr[simulation] brings (about 1 min).
FLOWER_RAY_TESTS := tests/test_flower.py tests/test_flower_app.py tests/test_ray_executor.py
FLOWER_CLI_TESTS := tests/test_federated.py tests/test_cli.py tests/test_cli_options.py tests/test_commands.py \
	tests/test_reports.py tests/test_reliability.py
FLOWER_PYTEST = CLAIR_REQUIRE_FLOWER=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN_FLOWER)/python -m pytest -q

test-flower: install-flower
	$(FLOWER_PYTEST) $(PYTEST_JOBS) $(FLOWER_CLI_TESTS)
	$(FLOWER_PYTEST) $(FLOWER_RAY_TESTS)

# The federated experiment: 12 clients (4 attackers), 10 rounds, clair against Flower's FedAvg,
# FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan, clean and attacked, 3 seeds; writes
# experiments/federated/results/ (about 25 min on 2 cores).
fl-experiment: install-flower
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(BIN_FLOWER)/python -m experiments.federated --out experiments/federated/results

clean:
	rm -rf $(VENV) $(VENV_FLOWER) site .pytest_cache .ruff_cache .mypy_cache .hypothesis
