# syntax=docker/dockerfile:1
# The modeldeploy operator image. One image, three uses (its ENTRYPOINT is the `modeldeploy` CLI):
#   operator (default):  modeldeploy run --standalone --all-namespaces      (kopf + our handlers)
#   model stager:        modeldeploy stage --uri=... --dest=/models ...      (init container the
#                        operator adds to Triton pods; it passes `stage ...` as args, no command)
#   offline rendering:   modeldeploy render -f md.yaml
# The Helm chart runs `modeldeploy-operator run ...` explicitly (command + args).
#
# Build:  docker build -t ghcr.io/modeldeploy/operator:0.1.0 .
# The base is pinned to a patch release (a tag, not a digest: rebuilds pick up Debian security
# fixes of that release); bump it deliberately.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/modeldeploy
COPY pyproject.toml README.md ./
COPY operator/ operator/
# A regular (non-editable) install; pip byte-compiles, so nothing is written at run time.
RUN /opt/modeldeploy/bin/pip install '.[worker]' \
 && /opt/modeldeploy/bin/modeldeploy --version \
 && /opt/modeldeploy/bin/modeldeploy-operator run --help >/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="modeldeploy-operator" \
      org.opencontainers.image.description="Kubernetes operator deploying models on NVIDIA Triton with progressive rollouts" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/modeldeploy/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp
RUN groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --home-dir /nonexistent --no-create-home \
            --shell /usr/sbin/nologin nonroot
COPY --from=build /opt/modeldeploy /opt/modeldeploy
# Numeric, so runAsNonRoot can verify it without resolving names.
USER 65532:65532
WORKDIR /tmp
# 8080: kopf health (/healthz), 8383: Prometheus metrics
EXPOSE 8080 8383
ENTRYPOINT ["modeldeploy"]
CMD ["run", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
