# LoRA Studio: the web page (default) and the training CLI, on NVIDIA GPUs.
#
#   docker build -t lora-trainer .
#   docker run --gpus all -p 7860:7860 -v "$PWD/datasets:/datasets" -v "$PWD/outputs:/outputs" lora-trainer
#   docker run --gpus all -v "$PWD/datasets:/datasets" -v "$PWD/outputs:/outputs" -v "$PWD/config:/config" \
#       lora-trainer --config /config/config.json
#   docker run --gpus all ... lora-trainer train --num-processes 4 --config /config/config.json
#
# torch from PyPI ships its own CUDA and cuDNN libraries; the CUDA base image supplies the NVIDIA container
# settings and a matching userland. The host needs an NVIDIA driver new enough for that CUDA version and the
# NVIDIA Container Toolkit. Another base: docker build --build-arg BASE_IMAGE=... .
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# tini is PID 1: it passes docker stop's SIGTERM on to the whole process group and reaps children
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv tini ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.txt /app/requirements.txt
RUN pip install -r /app/requirements.txt

# a non-root user (uid 1000; the base image's own 'ubuntu' user is removed to free the id)
ARG UID=1000
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --create-home --uid ${UID} --shell /bin/bash studio \
    && mkdir -p /datasets /outputs /cache \
    && chown studio:studio /datasets /outputs /cache

COPY --chown=studio:studio . /app

USER studio
ENV LORA_STUDIO_OUTPUTS=/outputs \
    LORA_STUDIO_DATASETS=/datasets \
    LORA_STUDIO_CACHE=/cache/lora-studio \
    HF_HOME=/cache/huggingface \
    GRADIO_ANALYTICS_ENABLED=False
VOLUME ["/datasets", "/outputs", "/cache"]
EXPOSE 7860

HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "/app/docker/healthcheck.py"]

ENTRYPOINT ["tini", "-g", "--", "python", "/app/docker/entrypoint.py"]
CMD ["web", "--host", "0.0.0.0", "--port", "7860"]
