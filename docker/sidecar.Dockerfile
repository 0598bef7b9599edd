# The webhook-worker sidecar. Build from the repository root:
#   docker build -f docker/sidecar.Dockerfile -t webhook-worker .
# Small (python slim, no compilers in the final stage), runs as an unprivileged user, and
# reports health on /healthz (METRICS_ADDR, port 9464).

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY sql ./sql
COPY plpython ./plpython
# The wheel carries the migrations (sidecar/_sql), so `webhook-worker migrate` works from the image.
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin webhook
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-compile /wheels/*.whl && rm -rf /wheels
USER 10001:10001
WORKDIR /tmp
ENV PYTHONUNBUFFERED=1 \
    METRICS_ADDR=0.0.0.0:9464 \
    LOG_FORMAT=json
EXPOSE 9464
# No curl in the image: Python's urllib does the check. tests/integration/test_docker_steps.py runs this
# exact command against a sidecar outside Docker.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["webhook-worker"]
CMD ["run"]
