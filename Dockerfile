# The Agent Orchestrator Service. Generated code is committed, so the image needs no codegen step.
FROM python:3.11-slim AS build
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin orchestrator
COPY --from=build /install /usr/local
USER orchestrator
ENV PYTHONUNBUFFERED=1 \
    ORCH_LISTEN_ADDRESS=0.0.0.0:50051 \
    ORCH_LOG_FORMAT=json
EXPOSE 50051 8000 9464
# Uses the gRPC health protocol (grpc.health.v1.Health/Check), not a TCP probe.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["orchestrator", "health", "--address", "127.0.0.1:50051", "--timeout", "3"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["orchestrator"]
CMD ["serve"]
