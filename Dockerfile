# GPU image: CUDA PyTorch from PyPI (torch 2.13.0's default Linux wheels are CUDA builds).
# Weights are not baked in: mount a weights directory at /weights (see weights/README.md).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    PARTICALIZE_WEIGHTS_DIR=/weights \
    PARTICALIZE_DATA_DIR=/data \
    PARTICALIZE_HOST=0.0.0.0 \
    PARTICALIZE_PORT=8000

WORKDIR /app
RUN pip install "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY particalize ./particalize
COPY pipeline ./pipeline
COPY server ./server
COPY weights ./weights
RUN pip install . && useradd --create-home --uid 1000 particalize \
    && mkdir -p /weights /data && chown particalize /weights /data
USER particalize
VOLUME ["/weights", "/data"]
EXPOSE 8000
# Binding 0.0.0.0 needs API keys (PARTICALIZE_API_KEYS) unless PARTICALIZE_ALLOW_UNAUTHENTICATED_PUBLIC=1.
CMD ["particalize", "serve"]
