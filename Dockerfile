# syntax=docker/dockerfile:1
#
# Usage Analytics API container image.
#
#   docker build -t usage-api .
#   docker run --rm -e DATABASE_URL=postgresql://user:pass@host:5432/usage_api -p 8000:8000 usage-api
#
# The image never starts an embedded PostgreSQL: DATABASE_URL must always be set
# (USAGE_API_EMBEDDED_DATABASE=false below makes every command refuse, in one line, without it).
# See docker-compose.yml for a full stack (db + migrate + api, optional demo).

# Both stages use the same base so the venv's interpreter path (/usr/local/bin/python3)
# is identical in builder and runtime.

# --------------------------------------------------------------------------
# Builder: resolve the locked dependencies and install the project into a venv
# --------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS builder

# Keep in step with the uv that wrote uv.lock (`uv --version`).
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir "uv==${UV_VERSION}"

# UV_PROJECT_ENVIRONMENT: the venv lives at /app/.venv in both stages, so its
#   console scripts' shebangs stay valid after the copy.
# UV_PYTHON_DOWNLOADS=never + UV_PYTHON: build against the image's own
#   /usr/local/bin/python3, which the runtime stage (same base) also has.
# UV_LINK_MODE=copy: the uv cache is a separate mount (other filesystem), so
#   uv cannot hardlink from it; copy explicitly instead of warning and falling back.
ENV UV_PROJECT_ENVIRONMENT=/app/.venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_PYTHON=/usr/local/bin/python3 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy

WORKDIR /app

# 1) Third-party dependencies only: this layer is reused until the lock changes.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable --no-install-project

# 2) The project itself, installed as a regular (non-editable) wheel so the
#    runtime stage needs no source tree.
# The migrations are part of the package (src/usage_api/migrations).
COPY README.md ./
COPY src/ ./src/
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable

# --------------------------------------------------------------------------
# Runtime: the venv only, non-root
# --------------------------------------------------------------------------
FROM python:3.11-slim-bookworm AS runtime

# Numeric ids (hadolint DL3066): resolvable by the host and by Kubernetes'
# runAsNonRoot check. Keep the USER line below in step.
RUN groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app \
        --home-dir /app --no-create-home --shell /usr/sbin/nologin app

WORKDIR /app

# Owned by root and read-only for the app user: nothing here is written at run time.
COPY --from=builder /app/.venv /app/.venv

# USAGE_API_EMBEDDED_DATABASE=false: in a container the embedded PostgreSQL would keep its
# data in the container's own layer, lost with it; a missing DATABASE_URL is a mistake.
ENV PATH="/app/.venv/bin:$PATH" \
    VIRTUAL_ENV=/app/.venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    USAGE_API_EMBEDDED_DATABASE=false

USER 10001:10001

EXPOSE 8000

# No curl in the slim image: use the standard library. urlopen raises (exit 1)
# on connection errors and on any non-2xx status.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

ENTRYPOINT ["usage-api"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
