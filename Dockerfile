# The recorder's image: one image for every service in docker-compose.yml, which
# picks the process (worker, beat, flower, subscribe) with its `command`.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Only what the package needs (see .dockerignore for the rest of the checkout).
COPY pyproject.toml README.md celeryconfig.py ./
COPY worker/ worker/
COPY tasks/ tasks/
COPY fake_binance/ fake_binance/
# With the PostgreSQL driver, so DATABASE_URL may name either backend.
RUN pip install --no-cache-dir ".[postgres]" \
    && rm -rf build *.egg-info

# The code stays root's and read-only; the service writes only to the data volume.
# The directory exists (owned by the user) before VOLUME, so a fresh named volume
# starts with that owner instead of root.
RUN useradd --create-home --uid 10001 recorder \
    && mkdir -p /app/data \
    && chown recorder:recorder /app/data
USER recorder
VOLUME ["/app/data"]

CMD ["celery", "-A", "worker", "worker", "-l", "INFO"]
