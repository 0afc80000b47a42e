# The image of the demo app, the LLM simulator, the load generator and the alert log
# (docker-compose.yml runs it with different commands).
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY otel_disconnect ./otel_disconnect
RUN pip install --no-cache-dir ".[demo]" "opentelemetry-exporter-otlp-proto-http>=1.27"
USER nobody
CMD ["otel-disconnect", "--help"]
