# The inference server image: the embedded EfficientNet-Lite0 by default, your models through a volume.
#   CPU (default):  docker build -t torch-serve .
#   GPU (CUDA):     docker build -t torch-serve:gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
# BASE_IMAGE lets a machine without a registry build from a locally made Python 3.11 image, and
# PIP_INDEX_URL / PIP_FIND_LINKS / PIP_NO_INDEX (pip's own variables: build arguments, unset in the
# running container but shown by docker history, so no tokens in them) let a machine
# without direct PyPI access install from its mirror or wheelhouse; tests/container.py does both.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SERVE_HOST=0.0.0.0 \
    PORT=8000 \
    SERVE_GRPC_PORT=8081 \
    PYTHONPATH=/srv/user
# ONNX exports (runtime: auto) in the writable tmp (compose: a tmpfs, Kubernetes: an emptyDir): made once
# per container, read by every worker and restart after it.
ENV SERVE_ONNX_CACHE_DIR=/tmp/torch-serve-onnx

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin serve \
    && mkdir -p /srv/user && chown serve /srv/user \
    && python3 -m venv /opt/venv
# A virtual environment: works on the slim image and on a Debian base whose Python is
# "externally managed" (PEP 668) alike.
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /app
COPY requirements.txt .
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_NO_INDEX
RUN pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -r requirements.txt
COPY serve/ serve/
COPY models/ models/

USER serve
# 8000: HTTP (REST, V2, KServe V1, /metrics); 8081: gRPC (the Open Inference Protocol and grpc.health.v1;
# SERVE_GRPC_PORT=0 turns it off).
EXPOSE 8000 8081
# With TLS on (SERVE_TLS_CERT_FILE) the probe asks over HTTPS without checking the certificate: it
# reaches the server's own loopback, and the certificate names the service, not 127.0.0.1. Set TLS
# through the SERVE_TLS_* variables (not models.yaml) so the probe sees it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python -c "import os, ssl, urllib.request; tls = bool(os.environ.get('SERVE_TLS_CERT_FILE')); urllib.request.urlopen('%s://127.0.0.1:%s/ready' % ('https' if tls else 'http', os.environ.get('PORT', '8000')), timeout=2, context=ssl._create_unverified_context() if tls else None)"
STOPSIGNAL SIGTERM
CMD ["gunicorn", "-c", "serve/gunicorn_conf.py", "serve.app:create_app()"]
