# peertrain — `make run` starts the whole platform in one process; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: build run test lint bench peer register coordinator monitor api flower compose-check clean

build: $(STAMP)

# Reinstall only when the requirements change.
$(STAMP): requirements.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $(STAMP)

run: build
	$(BIN)/python -m embedded

test: build
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: build
	$(BIN)/ruff check .
	$(BIN)/lint-imports

bench: build
	$(BIN)/python bench/trainer.py
	$(BIN)/python bench/api.py
	$(BIN)/python bench/signin.py
	$(BIN)/python bench/session.py
	$(BIN)/python bench/federated.py

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

api: build
	$(BIN)/granian --interface wsgi --factory --host $${HOST:-127.0.0.1} --port $${PORT:-8000} \
		--workers $${API_WORKERS:-2} --blocking-threads $${API_THREADS:-2} --no-ws webapp:create_app

flower: build
	$(BIN)/celery -A tasks flower --address=127.0.0.1 --port=$${FLOWER_PORT:-5555}

compose-check:
	docker-compose config -q

clean:
	rm -rf $(VENV) var .pytest_cache
