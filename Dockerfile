# GPU image for both roles: `particalize serve` (the default command) and `particalize worker`.
# CUDA PyTorch comes from PyPI (torch 2.13.0's default Linux x86_64 wheels are CUDA builds, with their CUDA
# libraries as pip packages), so the base image needs no CUDA toolkit; the host needs an NVIDIA driver and the
# NVIDIA Container Toolkit. The s3 extra (s3fs) is installed, for PARTICALIZE_STORAGE_URL=s3://...
# Weights are never baked in (.dockerignore keeps weights/files and *.safetensors out of the build context):
# mount a weights directory at /weights (see weights/README.md and docs/scale-out.md).
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PARTICALIZE_WEIGHTS_DIR=/weights \
    PARTICALIZE_DATA_DIR=/data \
    PARTICALIZE_HOST=0.0.0.0 \
    PARTICALIZE_PORT=8000

WORKDIR /app
# torch first, in its own layer: the largest download, unchanged when the project's code changes
RUN pip install "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY particalize ./particalize
COPY pipeline ./pipeline
COPY server ./server
# only the weights package's code: a weights directory kept inside the checkout never reaches the image
COPY weights/*.py weights/README.md ./weights/
RUN pip install ".[s3]" \
    && useradd --create-home --uid 1000 particalize \
    && mkdir -p /weights /data \
    && chown particalize /weights /data
USER particalize
VOLUME ["/weights", "/data"]
EXPOSE 8000
# Binding 0.0.0.0 needs API keys (PARTICALIZE_API_KEYS) unless PARTICALIZE_ALLOW_UNAUTHENTICATED_PUBLIC=1.
# A GPU worker without the API: `particalize worker` (one container per GPU, sharing a PostgreSQL database).
CMD ["particalize", "serve"]
