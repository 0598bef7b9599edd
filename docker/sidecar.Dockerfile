# The webhook-worker sidecar. Build from the repository root:
#   docker build -f docker/sidecar.Dockerfile -t webhook-worker .
# Small (python slim, no compilers in the final stage), runs as an unprivileged user, and
# reports health on /healthz (METRICS_ADDR, port 9464 by default). One image serves both the
# migrate job and the workers (docker/compose.yaml builds it once).

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
# Dependencies first, at the versions of constraints.txt (the ones CI tests): this layer is
# rebuilt only when pyproject.toml or constraints.txt change, not on every code change.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && pip wheel --no-cache-dir --wheel-dir /wheels/deps -c constraints.txt -r requirements.txt
COPY README.md ./
COPY sidecar ./sidecar
COPY sql ./sql
COPY plpython ./plpython
# The wheel carries the migrations (sidecar/_sql), so `webhook-worker migrate` works from the image.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/app .

FROM python:3.11-slim-bookworm
ARG REVISION=unknown
LABEL org.opencontainers.image.title="webhook-worker" \
      org.opencontainers.image.description="PostgreSQL-native webhook worker for NATS JetStream (sidecar)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.source="docker/sidecar.Dockerfile of pg-nats-webhook-worker" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin webhook
COPY --from=build /wheels/deps /wheels/deps
RUN pip install --no-cache-dir --no-compile --no-index /wheels/deps/*.whl && rm -rf /wheels/deps
COPY --from=build /wheels/app /wheels/app
RUN pip install --no-cache-dir --no-compile --no-index --no-deps /wheels/app/*.whl && rm -rf /wheels/app
USER 10001:10001
WORKDIR /tmp
ENV PYTHONUNBUFFERED=1 \
    METRICS_ADDR=0.0.0.0:9464 \
    METRICS_ADDR_FILE=/tmp/webhook-worker.metrics-addr \
    LOG_FORMAT=json
EXPOSE 9464
# No curl in the image: Python's urllib does the check, on the address the worker serves: the one it
# bound (written to /tmp/webhook-worker.metrics-addr, a port range picks a free port), else METRICS_ADDR.
# tests/integration/test_docker_steps.py runs this exact command against a sidecar outside Docker.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; a = open(f).read().strip() if os.path.exists(f := os.environ.get('METRICS_ADDR_FILE', '/tmp/webhook-worker.metrics-addr')) else os.environ.get('METRICS_ADDR', '127.0.0.1:9464'); h, _, p = a.rpartition(':'); h = h.strip('[]'); h = '127.0.0.1' if h in ('', '0.0.0.0') else '[::1]' if h == '::' else f'[{h}]' if ':' in h else h; sys.exit(0 if urllib.request.urlopen(f'http://{h}:{p.split(chr(45))[0]}/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["webhook-worker"]
CMD ["run"]
