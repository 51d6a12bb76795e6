# mediagen: one image for the API (default), the worker, migrations and the fake Replicate.
# Build: docker build -t mediagen .   Settings come from the environment at run time; none are baked in.

FROM python:3.11-slim AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /build
# Dependencies first, in their own layer: a code change does not reinstall them.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --no-deps .

FROM python:3.11-slim
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 mediagen \
    && useradd --system --no-log-init --uid 10001 --gid mediagen --home-dir /app --shell /usr/sbin/nologin mediagen
WORKDIR /app
COPY --from=builder /opt/venv /opt/venv
COPY alembic.ini ./
COPY migrations ./migrations
# Local storage (MEDIAGEN_STORAGE_BACKEND=local) writes under /app/media: mount a volume there.
RUN mkdir /app/media && chown mediagen:mediagen /app/media
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
CMD ["uvicorn", "--factory", "mediagen.api.app:create_app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log", "--http", "mediagen.api.serving:HeaderTimeoutProtocol"]
