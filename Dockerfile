# qb-port-sync container image.
#   docker build -t qb-port-sync .
#   docker run --rm -v ./config.toml:/etc/qb-port-sync/config.toml:ro qb-port-sync --once --json
# BASE_IMAGE must provide python3 (3.11+) with the venv module and useradd.
ARG BASE_IMAGE=python:3.11-slim

# Stage 1: build the wheel and install it, with its dependencies, into a
# virtualenv that the runtime stage copies whole.
FROM ${BASE_IMAGE} AS builder
# A directory of wheels inside the build context to use instead of the
# package index, for offline builds (scripts/check-packaging sets it).
ARG WHEELHOUSE=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY . .
RUN python3 -m venv /opt/build \
 && /opt/build/bin/pip wheel ${WHEELHOUSE:+--no-index --find-links "/src/$WHEELHOUSE"} \
        --wheel-dir /wheels . \
 && python3 -m venv /opt/qbportsync \
 && /opt/qbportsync/bin/pip install --no-index --find-links /wheels qbportsync \
 && /opt/qbportsync/bin/python -c \
        "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

# Stage 2: the runtime. No compilers, no wheels, no source tree: only the
# virtualenv, the example config and an unprivileged user.
FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 qbportsync \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin qbportsync \
 && mkdir -p /etc/qb-port-sync \
 && install -d -m 0700 -o qbportsync -g qbportsync /var/lib/qb-port-sync
COPY --from=builder /opt/qbportsync /opt/qbportsync
COPY config/config.example.toml /etc/qb-port-sync/config.example.toml
# The record of refused logins; mount a volume there (-v qbps-state:/var/lib/
# qb-port-sync) so that --once runs share it and never earn a login ban.
# The container is the boundary: unless the mounted config says otherwise,
# /metrics and /healthz listen on every address of the container (so
# `docker run -p 9000:9000` and a Prometheus scrape reach them), and the
# health check is served on 9000 even with metrics off.
ENV PATH=/opt/qbportsync/bin:$PATH \
    STATE_DIRECTORY=/var/lib/qb-port-sync \
    PYTHONUNBUFFERED=1 \
    QB_PORT_SYNC_LISTEN_ADDRESS=0.0.0.0 \
    QB_PORT_SYNC_HEALTH_PORT=9000 \
    QBPORTSYNC_HEALTHZ_URL=http://127.0.0.1:9000/healthz
USER qbportsync
EXPOSE 9000
# The image has no curl: ask Python. Any answer but 200 (503 before the first
# successful update) or no answer marks the container unhealthy.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['QBPORTSYNC_HEALTHZ_URL'], timeout=4)"]
ENTRYPOINT ["qb-port-sync"]
CMD ["--config", "/etc/qb-port-sync/config.toml"]
