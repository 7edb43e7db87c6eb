# mcpool: `make demo` runs the demo, `make test` runs the tests (both as root; both install
# what they need first). See README.md.
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test unit lint bench image clean lab-up lab-down

setup:
	@scripts/install-deps.sh

demo: setup
	$(VENV)/bin/mcpool demo --cluster --implicit

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check proxy operator tests bench
	$(VENV)/bin/mypy proxy/mcpool_proxy proxy/mcpool_tools proxy/mcpool_dashboards operator/mcpool_operator bench

bench: setup
	$(PY) -m bench.run

# Both images from the one Dockerfile's named stages (needs a Docker engine with BuildKit).
IMAGE_REPO ?= ghcr.io/mptcp-dev/mcpool
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
image:
	@command -v docker >/dev/null || { echo "make image: needs docker (no engine here? the build steps are tested by tests/unit/test_image_build.py)" >&2; exit 1; }
	docker build --target proxy -t $(IMAGE_REPO):$(IMAGE_TAG) .
	docker build --target operator -t $(IMAGE_REPO)-operator:$(IMAGE_TAG) .

lab-up: setup
	$(VENV)/bin/mcpool lab up

lab-down: setup
	$(VENV)/bin/mcpool lab down

clean:
	-$(VENV)/bin/mcpool lab down 2>/dev/null
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
