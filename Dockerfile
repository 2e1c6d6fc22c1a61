# syntax=docker/dockerfile:1
# oodguard gateway image: the serving side only (base install: no torch), multi-stage.
#
#   docker build -t oodguard-gateway .                                  # onnxruntime (CPU)
#   docker build -t oodguard-gateway:gpu --build-arg ORT_PACKAGE=onnxruntime-gpu .
#   docker run -p 50051:50051 -v "$PWD/model_repository:/models:ro" oodguard-gateway
#
# Every package comes from a lock with its hashes checked (scripts/lock.sh regenerates them): the build stage's
# setuptools from locks/build.txt; the runtime stage's dependencies from locks/gateway-${ORT_PACKAGE}.txt (the base
# dependencies with onnxruntime replaced by ORT_PACKAGE, never both), then the wheel itself without dependencies.
# HEALTHCHECK asks the gRPC health service.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: the oodguard wheel ---------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY locks/build.txt ./locks/
RUN pip install --no-cache-dir --require-hashes -r locks/build.txt
COPY pyproject.toml README.md ./
COPY oodguard ./oodguard
COPY cli ./cli
COPY export ./export
COPY queues ./queues
COPY serve ./serve
COPY clients ./clients
COPY harvest ./harvest
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels .

# -- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG ORT_PACKAGE=onnxruntime
LABEL org.opencontainers.image.title="oodguard gateway" \
      org.opencontainers.image.description="gRPC OOD guard gateway (embedded ONNX Runtime or Triton backend)" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.oodguard.onnxruntime="${ORT_PACKAGE}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OODGUARD_LISTEN=0.0.0.0:50051 \
    OODGUARD_REPOSITORY=/models \
    OODGUARD_QUEUE_PATH=/var/lib/oodguard/queue.sqlite \
    OODGUARD_QUEUE_SPOOL_PATH=/var/lib/oodguard/queue.spool \
    OODGUARD_METRICS_PORT=9464
COPY locks/gateway-${ORT_PACKAGE}.txt /wheels/requirements.txt
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --require-hashes --no-deps -r /wheels/requirements.txt \
 && pip install --no-cache-dir --no-deps /wheels/oodguard-*.whl \
 && rm -rf /wheels \
 && python -c "import importlib.metadata as m, importlib.util as u; ort = {d.metadata['Name'].lower() for d in m.distributions()} & {'onnxruntime', 'onnxruntime-gpu'}; assert len(ort) == 1, ort; assert u.find_spec('torch') is None; import oodguard.serve.server, oodguard.clients.healthcheck" \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/oodguard --create-home --shell /usr/sbin/nologin oodguard
USER 10001:10001
WORKDIR /var/lib/oodguard
VOLUME ["/var/lib/oodguard"]
# 50051: gRPC (OODGuard, health, reflection); 9464: Prometheus metrics (OODGUARD_METRICS_PORT)
EXPOSE 50051 9464
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "oodguard.clients.healthcheck", "--timeout", "4"]
ENTRYPOINT ["oodguard", "serve"]
