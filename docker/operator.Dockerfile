# The llmops operator image: `llmops run` (kopf) as a non-root user on a small, pinned Python base.
# The release workflow publishes it as ghcr.io/<owner>/llmops-operator:<version>. Build it yourself from the repository
# root:  docker build -f docker/operator.Dockerfile -t <registry>/llmops-operator:0.1.0 .
# The operator never imports Ray, vLLM or LLaMA-Factory: the image holds only pyproject.toml's `dependencies`.

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml ./
COPY operator ./operator
RUN python -m pip install --no-cache-dir --upgrade pip \
 && python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# A passwd entry for the numeric user: kopf names itself after the user when POD_ID is not set.
RUN groupadd --gid 65532 llmops \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin llmops
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir --no-index --find-links /wheels llmops && rm -rf /wheels
USER 65532:65532
# probe (kopf /healthz) and Prometheus /metrics: `llmops run` defaults
EXPOSE 8080 9090
ENTRYPOINT ["llmops"]
CMD ["run"]
