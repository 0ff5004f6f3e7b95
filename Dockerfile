# syntax=docker/dockerfile:1
# The eCard service image: dependencies built into a virtualenv in the builder stage (compilers
# there only), copied with the source into a slim runtime that runs as a non-root user.
# Build: docker build -t ecard .   Run: see compose.yaml and deploy/k8s/.

FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY app app
COPY crypto crypto
# The project's dependencies only (with python-pkcs11, for issuer keys in an HSM: mount the vendor's module and
# set ECARD_PKCS11_MODULE): the code itself runs from /app, where var/ is the writable part.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --upgrade pip \
    && /opt/venv/bin/pip install ".[hsm]" -c constraints.txt \
    && /opt/venv/bin/pip uninstall -y ecard

FROM python:3.11-slim AS runtime
RUN useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin ecard
COPY --from=builder /opt/venv /opt/venv
WORKDIR /app
COPY app app
COPY crypto crypto
COPY deploy/entrypoint.sh deploy/entrypoint.sh
RUN mkdir -p /app/var/prometheus /keys && chown -R ecard:ecard /app/var
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    WEB_CONCURRENCY=2 \
    ECARD_MODE=production \
    ECARD_KEYS_DIR=/keys \
    PROMETHEUS_MULTIPROC_DIR=/app/var/prometheus
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '8000'), timeout=2)"]
ENTRYPOINT ["/app/deploy/entrypoint.sh"]
CMD ["serve"]
