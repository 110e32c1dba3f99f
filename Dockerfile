# syntax=docker/dockerfile:1
# The raysnet image: Ray head, Ray GPU workers, the RayJob submitter and the MLflow server all run it.
#
#   docker build -t ghcr.io/raysnet/raysnet:0.1.0 .
#   docker push ghcr.io/raysnet/raysnet:0.1.0
#
# That reference (registry/name:tag, the tag being the package version in pyproject.toml) is the one
# cluster/*.yaml and k8s/ use; tests/test_deploy.py checks that they all agree. To push elsewhere,
# see "Your own registry" in k8s/README.md.
#
# CUDA comes with the PyTorch wheels (the nvidia-* packages they depend on bring the CUDA runtime,
# cuDNN and NCCL), the same build the test suite runs, so the base needs only Python 3.11 and the
# host only the NVIDIA driver: torch 2.14.1+cu130 needs driver >= 580. For an older driver, build
# with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128.
#
# Ports a Ray node listens on (defaults; cluster/ and k8s/ keep them):
#   6379   GCS (head)                    8265   dashboard and job submission API (head)
#   10001  Ray Client server (head)      8080   metrics export (KubeRay's --metrics-export-port)
#   52365  dashboard agent (every node)  10002-19999  worker processes (every node)
#   node manager, object manager and runtime-env agent ports are picked at random
#   5000   MLflow tracking server (when this image runs it)
# None of them is meant for the internet: cluster/ binds to private addresses, k8s/ uses ClusterIP
# services behind NetworkPolicies.
#
# Base image: a full patch release, never a floating tag (python:3.11-slim becomes another Python
# under a rebuild); moving to a newer one (security fixes) is a deliberate change of this line. Even
# a patch tag is rebuilt upstream (Debian updates), a digest never: release builds pin it as well,
# with the digest `docker buildx imagetools inspect <the tag below>` prints,
#   FROM python:3.11.17-slim-bookworm@sha256:<that digest>
# and deployments run the image built here by digest (k8s/README.md, "Image pinning").
FROM python:3.11.17-slim-bookworm

ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ARG TORCH_INDEX=https://pypi.org/simple
ARG GIT_REVISION=unknown

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    # Let the NVIDIA container runtime mount the driver's compute libraries and nvidia-smi. The
    # GPUs themselves are chosen by the runtime (docker --gpus, the Kubernetes device plugin):
    # NVIDIA_VISIBLE_DEVICES is deliberately not set here, so a pod without a GPU limit sees none.
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    # numba (FFCV's JIT) caches compiled code; site-packages is read-only for the runtime user.
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    RAY_USAGE_STATS_ENABLED=0

# The system libraries FFCV compiles and links against (the list in install.sh) and a compiler to
# build it; libgl1/libglib2.0-0 for opencv-python (an FFCV dependency); rsync and ssh for `ray up`,
# which syncs files into the container and reaches the workers from the head's container; socat
# for the loopback relays cluster/*.yaml puts in front of the dashboard and MLflow.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential pkg-config libturbojpeg0-dev libopencv-dev \
        libgl1 libglib2.0-0 \
        rsync openssh-client socat procps curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

WORKDIR /opt/raysnet
COPY pyproject.toml README.md ./
COPY raysnet/ raysnet/
# Sweep files: `python -m raysnet.tune /opt/raysnet/tuning/NAME.yaml` (the k8s sweep RayJob).
COPY tuning/ tuning/
# psycopg2: the MLflow server's PostgreSQL backend store (k8s/base/mlflow.yaml). boto3 and the
# Google API client: the Ray autoscaler on a `ray up` head launches EC2 / GCE workers with them.
RUN pip install . psycopg2-binary boto3 google-api-python-client google-auth-httplib2 \
    && python -c "import ffcv, ray, mlflow, raysnet.models"

# Non-root, uid 1000 (the uid KubeRay's examples and Ray's images use); k8s pins runAsUser to it.
RUN useradd --create-home --uid 1000 --user-group --shell /bin/bash ray
USER 1000
WORKDIR /home/ray

LABEL org.opencontainers.image.title="raysnet" \
      org.opencontainers.image.description="ResNets of He et al. 2015 on Ray Train, FFCV data, MLflow tracking" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.revision="${GIT_REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0"

EXPOSE 6379 8265 10001 8080 52365 5000

CMD ["bash"]
