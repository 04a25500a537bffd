# Every target runs from a fresh clone: `make test` installs what it needs first.
PY := .venv/bin/python
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install test quickstart bench ui clean

install: .venv/.installed

.venv/.installed: pyproject.toml
	python3.11 -m venv .venv || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# one torch thread per process: tests are many small ops, and threads oversubscribe a shared 2-core box
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q

# baseline vs CAMEO on both tiny backbones, then a side-by-side table (gin/sweeps/quickstart.gin)
quickstart: install
	OMP_NUM_THREADS=1 $(PY) -m cameo_bench sweep gin/sweeps/quickstart.gin --workers 2 --summary

bench: install
	OMP_NUM_THREADS=1 $(PY) -m pytest tests/benchmarks -q --benchmark-enable \
		--benchmark-json=reports/benchmarks/benchmarks.json

# the MLflow UI on 127.0.0.1, printing the runs-table address; e.g. make ui UI_ARGS='--experiment quickstart --open'
ui: .venv/.ui-installed
	$(PY) -m cameo_bench ui $(UI_ARGS)

.venv/.ui-installed: .venv/.installed
	$(PY) -m pip install -q -e '.[ui]'
	touch $@

clean:
	rm -rf .venv build *.egg-info
