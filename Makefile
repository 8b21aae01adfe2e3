# The two commands a newcomer needs: `make serve` and `make test`.
# The virtual environment lives outside the clone so the ~5.5 GB torch install is made once per machine;
# every run still calls pip install, so a missing or changed dependency is installed (or fails) here.
VENV ?= $(HOME)/.cache/serve-venv
PYTHON ?= $(shell command -v python3.11 || command -v python3)
PY := $(VENV)/bin/python

.PHONY: install serve test test-fast check bench soak wrk
$(PY):
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }  # no half-made venv that make takes as built

install: $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

serve: install  # the package's command (ckpt-serve serve): gunicorn with serve/gunicorn_conf.py; gRPC on 8081
	SERVE_GRPC_PORT=$${SERVE_GRPC_PORT:-8081} $(PY) -m serve serve

test: install
	$(PY) -m pytest

# The fast tier (docs/testing.md): no server process, Docker, browser, soak or slow model; under 2 minutes.
FAST := not server and not container and not browser and not soak and not slow
test-fast: install
	$(PY) -m pytest -m "$(FAST)"

check: install
	$(PY) -m serve check

cat.jpg: install
	$(PY) -c "from skimage import data; from PIL import Image; Image.fromarray(data.chelsea()).save('cat.jpg', quality=95)"

# Benchmarks (not part of the tests): wrk is Debian's HTTP load generator.
wrk:
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)

bench: install wrk
	$(PY) -m pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	$(PY) bench/bench.py
	$(PY) bench/grpc.py        # gRPC beside REST V2 and the plain route (docs/performance.md)
	$(PY) bench/many_models.py # 1-200 models under a memory budget (docs/performance.md, docs/many_models.png)
	$(PY) bench/int8.py --skip-served  # fp32 vs int8: in-process limits, the gate, served c=4/16 (docs/precision.md)
	$(PY) bench/detectors.py    # torchvision detectors: eager vs ONNX Runtime (split), same detections (docs/runtimes.md)
	$(PY) bench/overload.py --waits 250  # shed latency at 64 clients honouring Retry-After (docs/performance.md)
	$(PY) bench/tail.py         # the tail beside a hand-written Flask + ONNX Runtime app, resnet18 c=4/16

soak: install
	$(PY) bench/soak.py
