# Three images from one file:
#   worker     the stream worker and the operational commands, on CPU: ONNX Runtime, the tokenizer and
#              our code, no torch (the models are exported to ONNX by the trainer)
#   worker-gpu the same on CUDA: onnxruntime-gpu on NVIDIA's CUDA 13 + cuDNN 9 runtime
#   trainer    everything (torch included): `rtrec train` builds the model bundles
# docker compose builds each where a service names it as its target.

# Our code, copied once and installed (without dependencies) by every image.
FROM scratch AS source
COPY pyproject.toml README.md /app/
COPY streams /app/streams
COPY encoder /app/encoder
COPY infra /app/infra

FROM python:3.11-slim AS worker
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY infra/docker/worker-requirements.txt ./
RUN pip install -r worker-requirements.txt
COPY --from=source /app /app
RUN pip install --no-deps .
ENTRYPOINT ["rtrec"]
CMD ["worker"]

FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS worker-gpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH RTREC_ENCODER_PROVIDER=cuda
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* && python3 -m venv /opt/venv
WORKDIR /app
COPY infra/docker/worker-requirements.txt ./
RUN sed 's/^onnxruntime==/onnxruntime-gpu==/' worker-requirements.txt > gpu-requirements.txt \
    && pip install -r gpu-requirements.txt
COPY --from=source /app /app
RUN pip install --no-deps .
ENTRYPOINT ["rtrec"]
CMD ["worker"]

FROM python:3.11-slim AS trainer
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY --from=source /app /app
RUN pip install --no-deps .
ENTRYPOINT ["rtrec"]
CMD ["train"]
