# The demo trainer of deploy/compose.yaml: gradflow-agent from this checkout, CPU only.
FROM python:3.11-slim
WORKDIR /src
# torch first and pinned, so that installing the package never pulls another build. For a much smaller
# image, install the CPU-only wheel from PyTorch's own package index instead.
RUN pip install --no-cache-dir "torch==2.13.0"
COPY pyproject.toml README.md ./
COPY gradflow_agent ./gradflow_agent
RUN pip install --no-cache-dir .
EXPOSE 9464
ENTRYPOINT []
