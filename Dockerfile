# Gateway image (serving side only: no torch). A later issue completes it (multi-stage, health check).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY oodguard ./oodguard
COPY export ./export
COPY serve ./serve
COPY clients ./clients
RUN pip install --no-cache-dir .
RUN useradd --create-home oodguard
USER oodguard
ENTRYPOINT ["oodguard"]
