# NanoGrid worker (also used for Flower): Celery + the Docker SDK, talking to the
# host's dockerd through the mounted /var/run/docker.sock (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . /app

# pycurl (kombu's SQS transport) ships no Linux wheels: build it, then drop the
# compiler and headers but keep libcurl4, which it links against at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        gcc libc6-dev libcurl4-openssl-dev libssl-dev libcurl4 \
    && pip install . "flower>=2.0" \
    && apt-get purge -y --auto-remove gcc libc6-dev libcurl4-openssl-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*

CMD ["celery", "-A", "nanogrid_celery", "worker", "--loglevel=INFO"]
