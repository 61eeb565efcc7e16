# syntax=docker/dockerfile:1
# AuthPool server image: `docker build -t authpool:0.1.0 .` (the tag the
# manifests in deploy/k8s use; keep it equal to pyproject.toml's version).
# Two stages: the build stage installs the package and its dependencies (with
# the PostgreSQL driver) into a virtualenv; the runtime stage copies only that
# virtualenv onto a clean slim Python and runs as an unprivileged user.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/authpool
WORKDIR /src
# Only what the package is built from (see .dockerignore): the checked-in
# generated gRPC code lives in authpool_server/api, so no protoc is needed.
COPY pyproject.toml README.md ./
COPY authpool_server ./authpool_server
RUN /opt/authpool/bin/pip install --upgrade pip \
    && /opt/authpool/bin/pip install '.[postgres]' \
    && /opt/authpool/bin/authpool --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="authpool" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="A gRPC service that leases LLM-provider credentials from a budget-aware pool." \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric uid/gid, matching runAsUser/runAsGroup in deploy/k8s, and no
# login shell or home directory.
RUN groupadd --system --gid 10001 authpool \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin authpool \
    && mkdir -p /var/lib/authpool /etc/authpool \
    && chown 10001:10001 /var/lib/authpool
COPY --from=build /opt/authpool /opt/authpool
ENV PATH=/opt/authpool/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LOG_FORMAT=json \
    AUTHPOOL_DATA_DIR=/var/lib/authpool
# The root filesystem can be read-only: the store writes to /var/lib/authpool
# (a volume), nothing else is written but /tmp.
VOLUME ["/var/lib/authpool"]
USER 10001:10001
WORKDIR /var/lib/authpool
# 50051: gRPC (the API and the health service the probes use); 9464: admin HTTP (/metrics, /debug/*).
EXPOSE 50051 9464
# SIGTERM drains gracefully (health NOT_SERVING, in-flight calls finish, state flushed, exit 0).
STOPSIGNAL SIGTERM
ENTRYPOINT ["authpool", "serve"]
# The config must listen on 0.0.0.0 (deploy/k8s/base/auth-pool.json does);
# mount it at /etc/authpool or pass another --config.
CMD ["--config", "/etc/authpool/auth-pool.json"]
