# The stage image: what the Docker and Kubernetes runners run (`python -m semisup_tasks stage ...`,
# also `semisup ...`). PyTorch's Linux wheels from PyPI are the CUDA builds (the CUDA and cuDNN
# libraries come with them as nvidia-* wheels), so this image runs on GPUs with the NVIDIA
# container toolkit (`docker run --gpus all`) and on CPUs alike.
#   docker build -t semisup-stage:0.1.0 .
#   docker run --rm --gpus all semisup-stage:0.1.0 stage plan --store s3://bucket/semisup --run-id r1
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# PyTorch first: the largest layer, rebuilt only when its pin changes
RUN pip install "torch==2.14.1" "torchvision==0.29.1"
WORKDIR /opt/semisup
COPY pyproject.toml README.md ./
COPY semisup_tasks ./semisup_tasks
RUN pip install . && python -c "import semisup_tasks.stages"

# never run stages as root
RUN useradd --create-home --uid 10001 semisup
USER 10001
WORKDIR /home/semisup
ENTRYPOINT ["semisup"]
CMD ["--help"]
