# The Agent Orchestrator Service. Generated code is committed, so the image needs no codegen step.
# Every dependency comes from the lock files, each download checked against its hash, so a
# rebuild installs the same versions (`make lock` regenerates them from pyproject.toml).
FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements.lock requirements-build.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements-build.lock \
 && pip install --no-cache-dir --require-hashes --prefix=/install -r requirements.lock
COPY . .
RUN pip install --no-cache-dir --no-deps --no-build-isolation --prefix=/install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin orchestrator
COPY --from=build /install /usr/local
USER orchestrator
# No public demo keys unless asked for (ORCH_DEMO_KEYS=true): give the server REDIS_URL with
# ORCH_BOOTSTRAP_ADMIN_KEY, or ORCH_API_KEYS_FILE for the in-memory registry.
ENV PYTHONUNBUFFERED=1 \
    ORCH_LISTEN_ADDRESS=0.0.0.0:50051 \
    ORCH_LOG_FORMAT=json \
    ORCH_DEMO_KEYS=false
EXPOSE 50051 8000 9464
# The gRPC health protocol (grpc.health.v1.Health/Check), not a TCP probe. Without --address
# it probes the port of ORCH_LISTEN_ADDRESS with the server's TLS settings (ORCH_TLS_* and
# ORCH_HEALTHCHECK_*), so changing either needs no new HEALTHCHECK.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["orchestrator", "health", "--timeout", "3"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["orchestrator"]
CMD ["serve"]
