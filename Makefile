# The README's two commands: `make demo` (main job) and `make test`.
# Both create .venv and install the project into it from pyproject.toml on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/edgevit-build: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[cpu,openvino,builder,dev]'
	touch $@

.PHONY: install demo fleet-demo fleet-demo-stop test test-fast lint typecheck contracts check bench
install: $(BIN)/edgevit-build

demo: install
	$(BIN)/edgevit-build demo --out out/demo
	rm -f out/demo/results.jsonl
	$(BIN)/edgevit-agent --config configs/demo.yaml
	$(BIN)/python -m builder.demo score out/demo/results.jsonl out/demo/digits.json

# The fleet on one machine: a broker, three demo agents and a staged rollout of the Mixer bundle to them.
fleet-demo: install
	test -d out/demo/bundles/mixer-digits-cpu-int8 || $(BIN)/edgevit-build demo --out out/demo
	$(BIN)/python -m fleet.demo start --demo out/demo --out out/fleet-demo

fleet-demo-stop:
	$(BIN)/python -m fleet.demo stop --out out/fleet-demo

# Two workers, a test file each at a time (module fixtures stay in one process): the suite waits on agents,
# brokers, streams and canary windows about as much as it computes. A failed test runs once more: a test
# that times real processes can lose to the other worker's load; failing twice is failing (docs/testing.md).
PYTEST_WORKERS ?= -n 2 --dist loadfile --reruns 1

test:
	@scripts/system-deps
	@$(MAKE) --no-print-directory install
	$(BIN)/python -m pytest $(PYTEST_WORKERS)

# The unit tier: no services, no demo build, under a minute (tests/conftest.py says what is integration).
test-fast: install
	$(BIN)/python -m pytest $(PYTEST_WORKERS) -q -m "not integration and not slow"

# The checks CI runs before the tests (also in .pre-commit-config.yaml).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

contracts: install
	$(BIN)/lint-imports

check: lint typecheck contracts

bench: install
	$(BIN)/python -m pip install --quiet -e '.[cpu,openvino,builder,dev,bench]'
	$(BIN)/python bench/export_bench.py
	$(BIN)/python bench/build_bench.py
	$(BIN)/python bench/engine_bench.py
	$(BIN)/python bench/int8_outlier_bench.py
	$(BIN)/python bench/openvino_settings_bench.py
	$(BIN)/python bench/openvino_memory_bench.py
	$(BIN)/python bench/row_split_bench.py
	$(BIN)/python bench/worker_bench.py
	$(BIN)/python bench/agent_bench.py
	$(BIN)/python bench/camera_bench.py
	$(BIN)/python bench/swap_bench.py
	$(BIN)/python bench/canary_bench.py
	$(BIN)/python bench/fleet_bench.py
	$(BIN)/python bench/hostile_bench.py
