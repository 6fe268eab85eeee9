# Herald's container image: `docker build -t herald:0.1.0 .` (deploy/compose.yaml
# builds it). The same image runs every role (`herald run --roles ...`),
# `herald migrate`, `herald topology declare` and the sandbox.
#
# Two stages: the first builds Herald's wheel from the sources (the wheel
# carries the migrations of sql/ inside the package) and installs it, with its
# dependencies, into a virtual environment; the second copies only that
# environment. No source checkout is left in the image.
ARG PYTHON_IMAGE=python:3.12.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY consumer/ consumer/
COPY schemas/ schemas/
COPY sql/ sql/
RUN pip wheel --no-deps --wheel-dir /dist . \
    && python -m venv /opt/herald \
    && /opt/herald/bin/pip install /dist/herald-*.whl \
    && /opt/herald/bin/python -m compileall -q /opt/herald/lib \
    && cd / && /opt/herald/bin/python -c \
       "from consumer.migrate import discover; assert discover(), 'no migrations in the wheel'"

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="herald" \
      org.opencontainers.image.description="Reliable outbound messaging on RabbitMQ and PostgreSQL"
RUN groupadd --system --gid 10001 herald \
    && useradd --system --uid 10001 --gid herald --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin herald
COPY --from=build /opt/herald /opt/herald
ENV PATH=/opt/herald/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HERALD_HTTP_HOST=0.0.0.0 \
    HERALD_HTTP_PORT=8080 \
    HERALD_ADMIN_PORT=8081
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# 8080: the public listener (webhooks, /healthz, /readyz). 8081: the admin
# listener (admin API, console, /metrics), on the container's loopback unless
# HERALD_ADMIN_HOST says otherwise (Compose and Kubernetes set 0.0.0.0).
EXPOSE 8080 8081
# /healthz answers while the event loop runs; readiness (/readyz) is for orchestrators.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('HERALD_HTTP_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["herald"]
CMD ["run"]
