# One image for the four jobs: `docker run IMAGE generate|img2img|finetune|lora`, configured by env vars.
# Build: `make build`; CI builds this same file on a CPU stand-in base (`make test-image`, docs/container.md).

# NVIDIA's CUDA runtime image in its "base" flavour (libcudart, the forward-compatibility libraries and the
# NVIDIA_* variables the container toolkit reads). Not the "runtime"/"cudnn-runtime" flavours nor
# pytorch/pytorch: torch's cu128 wheels bring cuBLAS, cuDNN and NCCL as exactly pinned nvidia-* wheels and
# load only those, so those images would add gigabytes of second copies. CUDA 12.8 matches TORCH_INDEX_URL.
# Pinned by digest (the multi-arch index of the tag), so a rebuild gets the same base until this line
# changes; to move on: `docker buildx imagetools inspect nvidia/cuda:<tag>` and paste its digest.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04@sha256:133c78a0575303be34164d0b90137a042172bdf60696af01a3c424ab402d86e2

FROM ${BASE_IMAGE} AS builder
ARG DEBIAN_FRONTEND=noninteractive
# Python comes from the base's distribution (Ubuntu 24.04: 3.12), pinned by the base tag.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv $VIRTUAL_ENV

# torch alone first, from its own index: the biggest layer, and it changes less often than the rest.
# TORCH_SPEC is a pinned requirement or a wheel file (the CPU stand-in's), which hadolint cannot tell.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch==2.13.0
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install --index-url "$TORCH_INDEX_URL" "$TORCH_SPEC"

# Everything else at the exact versions CI tests; the torch==2.13.0 pin accepts the +cu128 (or +cpu) build.
COPY requirements/runtime.txt /src/requirements/runtime.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /src/requirements/runtime.txt

# The project as a wheel, installed in the final stage: a code change then rebuilds a layer of kilobytes,
# and nodes keep the gigabytes of dependencies they already pulled.
COPY pyproject.toml README.md /src/
COPY jobs /src/jobs
RUN --mount=type=cache,target=/root/.cache/pip \
    pip wheel --no-deps --wheel-dir /dist /src


FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# ca-certificates: the system trust store, for hub downloads behind a proxy with its own CA (SSL_CERT_FILE).
# tini: a real init as PID 1. The kernel ignores SIGTERM for a PID 1 without a handler, and Python
# installs the job's handler only after it starts: a pod stopped in its first second would hang
# until the grace period ends. tini forwards the signal and reaps, and exits with the job's code.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

# UID 1000, as the Kubernetes manifests expect. Ubuntu 24.04 images already give UID 1000 to `ubuntu`.
# Home is /tmp: the root filesystem is read-only in production, /tmp is a tmpfs or an emptyDir.
RUN if id ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
 && useradd --uid 1000 --user-group --home-dir /tmp --no-create-home --shell /usr/sbin/nologin app \
 && mkdir -p /cache/huggingface /outputs \
 && chown -R app:app /cache /outputs

COPY --from=builder /opt/venv /opt/venv
# COPY, not a bind mount: buildah's layer cache ignores a changed mount and would keep the old code.
COPY --from=builder /dist /tmp/dist
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps /tmp/dist/*.whl

# Nothing may write outside the volumes and /tmp, even under a UID without a home (OpenShift, runAsUser):
# bytecode is compiled at build time, and every cache that defaults to $HOME is sent to /tmp.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/cache/huggingface \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/matplotlib \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    CUDA_CACHE_PATH=/tmp/nv-compute-cache
VOLUME ["/cache", "/outputs"]
# Relative paths, the jobs' default output folders among them, land on the outputs volume, not the read-only root.
WORKDIR /outputs
USER 1000:1000

ARG BASE_IMAGE
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="pai-diffusion-jobs" \
      org.opencontainers.image.description="Batch jobs (generate, img2img, finetune, lora) for the PAI-Diffusion Chinese Stable Diffusion models" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.base.name="$BASE_IMAGE"

ENTRYPOINT ["tini", "--", "pai-diffusion"]
CMD ["--help"]
