# peertrain — `make run` starts the whole platform in one process; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: build run test test-fast lint bench peer register coordinator monitor api flower compose-check clean build-dev

# What running needs (requirements.txt); `make test`, `make lint` and `make bench` add the rest.
build: $(STAMP)

build-dev: $(DEV_STAMP)

# Reinstall only when the requirements change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .  # the peertrain command
	touch $(STAMP)

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(DEV_STAMP)

run: build
	$(BIN)/python -m embedded

test: build-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit lane: no service, no process of the platform's; what needs one is skipped (tests/services.py), and the
# few long checks marked `slow` (the API's fuzzing) wait for `make test`.
test-fast: build-dev
	TEST_SERVICES=off $(BIN)/python -m pytest --ignore=tests/e2e -m "not slow" $(PYTEST_ARGS)

lint: build-dev
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: build-dev
	$(BIN)/python -m bench.trainer
	$(BIN)/python -m bench.api
	$(BIN)/python -m bench.stream
	$(BIN)/python -m bench.signin
	$(BIN)/python -m bench.session
	$(BIN)/python -m bench.rounds
	$(BIN)/python -m bench.transfer
	$(BIN)/python -m bench.screening --alpha 0.1
	$(BIN)/python -m bench.federated
	$(BIN)/python -m bench.async_rounds
	$(BIN)/python -m bench.scale --private-broker
	$(BIN)/python -m bench.crowd
	$(BIN)/python -m bench.journal
	$(BIN)/python -m bench.search

# The distributed processes, for when BROKER_URL, RESULT_BACKEND, MONGODB_URI and STORAGE_URL name real services.
NAME ?= $(shell hostname)
# A peer machine: with the variables `make register` wrote to $(NAME).env in its environment, and nothing else.
peer: build
	$(BIN)/celery -A tasks.peer worker -Q peer.$(NAME) -n peer.$(NAME)@%h -c 1 --without-gossip --without-mingle \
		--loglevel=INFO

register: build
	$(BIN)/python -m tasks.registry add $(NAME) --env-file $(NAME).env

coordinator: build
	$(BIN)/celery -A tasks worker -Q $${COORDINATOR_QUEUE:-coordinator} -n coordinator@%h -E --loglevel=INFO

monitor: build
	$(BIN)/python -m tasks.monitor

# ASGI: event streams are coroutines, every other request runs the Flask app in a thread (webapp/asgi.py).
api: build
	$(BIN)/granian --interface asgi --factory --host $${HOST:-127.0.0.1} --port $${PORT:-8000} \
		--workers $${API_WORKERS:-2} --no-ws webapp.asgi:create_app

flower: build
	$(BIN)/celery -A tasks.celery flower --address=127.0.0.1 --port=$${FLOWER_PORT:-5555}

compose-check:
	docker-compose config -q

clean:
	rm -rf $(VENV) var .pytest_cache peertrain.egg-info
