# The project image: CLI, worker, trainer. (A torch-free runtime image for workers is planned.)
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streams ./streams
COPY encoder ./encoder
COPY infra ./infra
RUN pip install .
ENTRYPOINT ["rtrec"]
