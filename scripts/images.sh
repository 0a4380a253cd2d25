#!/usr/bin/env bash
# `make images`: build model-trainer/trainer:VERSION and model-trainer/operator:VERSION here, with
# no container registry and no network inside the builds:
#   1. a Docker engine: the one running, else Debian's docker.io, started in the background
#      (log: .cache/docker/dockerd.log);
#   2. the base image: python:3.11-slim-bookworm where it can be pulled, else
#      model-trainer/base:bookworm (scripts/base_image.sh, debootstrap; once);
#   3. wheelhouses of exactly the locked wheels, hashes checked, on the host (cached):
#      .cache/wheelhouse (everything but torch) and .cache/torch-wheels (torch and torch.txt);
#   4. both images, `docker build --network none` with OFFLINE=1.
# `--engine` stops after step 1. Idempotent; a second run takes seconds.
# `docker build -f trainer_image/Dockerfile .` works without any of this where the build can
# reach PyPI and download.pytorch.org.
#
# Env: MT_TORCH_SOURCE=auto|cpu|pypi  where the trainer's torch comes from. cpu: the CPU build of
#        the locked version from download.pytorch.org; pypi: the lock's PyPI build with the CUDA
#        libraries that `import torch` loads (not triton and the other optional ones), for hosts
#        that reach PyPI only; auto (default): cpu when download.pytorch.org answers.
#      MT_BASE_IMAGE  a base image to use instead of building model-trainer/base:bookworm.
#      DOCKER  the docker client; DOCKER_BUILDKIT  1 or 0 to choose the builder.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
say() { echo "images: $*" >&2; }
# Run a step and report how long it took.
step() {
  local what=$1 start=$SECONDS
  shift
  "$@"
  say "$what: $((SECONDS - start))s"
}

if command -v uv >/dev/null 2>&1; then uv=(uv); else uv=(python3 -m uv); fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
dockerfile_arg() { sed -n "s/^ARG $1=//p" trainer_image/Dockerfile; }
uv_version=$(dockerfile_arg UV_VERSION)
hatchling_version=$(dockerfile_arg HATCHLING_VERSION)
torch_index_url=$(dockerfile_arg TORCH_INDEX_URL)
base_image=${MT_BASE_IMAGE:-model-trainer/base:bookworm}
mkdir -p .cache/docker .cache/images

# 1. The Docker engine. Debian's client matches Debian's daemon (20.10): the newer client in
# /usr/local/bin talks to it too, but has no BuildKit without the buildx plugin.
docker_engine() {
  if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
  fi
  if "$DOCKER" info >/dev/null 2>&1; then return 0; fi
  if ! command -v dockerd >/dev/null 2>&1 && [ ! -x /usr/sbin/dockerd ]; then
    say "installing docker.io"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
      docker.io >/dev/null
    DOCKER=/usr/bin/docker
  fi
  say "starting dockerd (log: .cache/docker/dockerd.log)"
  local dockerd
  dockerd=$(command -v dockerd || echo /usr/sbin/dockerd)
  # In a session of its own: a Ctrl-C in the terminal that ran this (or pytest) leaves it be.
  if [ "$(id -u)" = 0 ]; then
    setsid nohup "$dockerd" >.cache/docker/dockerd.log 2>&1 &
    echo $! >.cache/docker/dockerd.pid
  else
    sudo sh -c "setsid nohup '$dockerd' >.cache/docker/dockerd.log 2>&1 &
      echo \$! >.cache/docker/dockerd.pid"
  fi
  for _ in $(seq 120); do
    if "$DOCKER" info >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  tail -20 .cache/docker/dockerd.log >&2
  say "dockerd did not come up within 60 s"
  return 1
}

choose_builder() {
  if [ -n "${DOCKER_BUILDKIT:-}" ]; then return 0; fi
  local client_major
  client_major=$("$DOCKER" version --format '{{.Client.Version}}' | cut -d. -f1)
  # Clients before 23 have BuildKit built in; later ones need the buildx plugin for it.
  if [ "$client_major" -lt 23 ] || "$DOCKER" buildx version >/dev/null 2>&1; then
    DOCKER_BUILDKIT=1
  else
    DOCKER_BUILDKIT=0
  fi
}

# 3. Wheelhouses. `pip download` runs under Python 3.11, so that the lock's markers pick the
# image's wheels, and only takes wheels that run on bookworm (glibc 2.36) on this architecture.
arch=$(uname -m)
platforms=()
for minor in $(seq 36 -1 5); do platforms+=(--platform "manylinux_2_${minor}_${arch}"); done
platforms+=(--platform "manylinux2014_${arch}" --platform "manylinux2010_${arch}")
platforms+=(--platform "manylinux1_${arch}")
pip_download() {
  "${uv[@]}" tool run --quiet --python 3.11 pip download --quiet --disable-pip-version-check \
    --only-binary=:all: "${platforms[@]}" --implementation cp --python-version 3.11 \
    --abi cp311 --abi abi3 --abi none "$@"
}

lock_export() {
  "${uv[@]}" export --frozen --no-dev --no-emit-project --no-header --no-annotate "$@"
}

# The requirements (stdin) whose markers hold for some Python 3.11.x on Linux here, the markers
# dropped: the image's own interpreter (3.11.2 in Debian, the newest 3.11 in python:3.11-slim)
# picks among them when it installs.
for_any_python311() {
  "${uv[@]}" run --frozen --no-sync python -c '
import re, sys
from packaging.markers import Marker
envs = [
    {"python_version": "3.11", "python_full_version": f"3.11.{micro}", "sys_platform": "linux",
     "platform_system": "Linux", "platform_machine": sys.argv[1], "os_name": "posix",
     "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    for micro in range(30)
]
for entry in re.split(r"\n(?=\S)", sys.stdin.read().strip()):
    first, _, rest = entry.partition("\n")
    requirement, _, marker = first.rstrip(" \\").partition(" ; ")
    if not marker or any(Marker(marker).evaluate(env) for env in envs):
        sys.stdout.write(requirement + (" \\\n" + rest if rest else "") + "\n")
' "$arch"
}

# The lock's torch family: torch itself, triton and the CUDA libraries.
torch_family() {
  lock_export --extra train --no-hashes \
    | sed -n 's/^\(torch\|triton\|nvidia-[a-z0-9-]*\|cuda-[a-z0-9-]*\)==.*/\1/p'
}

# Run FILL (a function that downloads into DIR) unless STAMP_FILE records these inputs already.
fill_wheelhouse() {
  local dir=$1 stamp_file=$2 stamp=$3 fill=$4
  if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && [ -d "$dir" ]; then
    say "$dir is up to date"
    return 0
  fi
  rm -rf "$dir" "$stamp_file"
  mkdir -p "$dir"
  "$fill"
  echo "$stamp" >"$stamp_file"
}

common_request=.cache/images/common.txt
tools_request=.cache/images/tools.txt
torch_request=.cache/images/torch-request.txt

download_common() {
  pip_download --no-deps --require-hashes -r "$common_request" -d .cache/wheelhouse
  pip_download -r "$tools_request" -d .cache/wheelhouse
}

common_wheelhouse() {
  local no_emit=() stamp
  for name in $(torch_family); do no_emit+=(--no-emit-package "$name"); done
  lock_export --extra train --extra operator "${no_emit[@]}" | for_any_python311 >"$common_request"
  printf 'uv==%s\nhatchling==%s\n' "$uv_version" "$hatchling_version" >"$tools_request"
  stamp=$(cat "$common_request" "$tools_request" <(echo "$arch") | sha256sum | cut -d' ' -f1)
  fill_wheelhouse .cache/wheelhouse .cache/images/wheelhouse.stamp "$stamp" download_common
}

torch_source() {
  local source=${MT_TORCH_SOURCE:-auto} probe
  probe="import urllib.request; urllib.request.urlopen('$torch_index_url/torch/', timeout=5)"
  case "$source" in
    auto) if python3 -c "$probe" >/dev/null 2>&1; then source=cpu; else source=pypi; fi ;;
    cpu | pypi) ;;
    *) say "MT_TORCH_SOURCE must be auto, cpu or pypi, not $source" && return 1 ;;
  esac
  echo "$source"
}

# The CPU wheel is not in the lock: torch.txt pins the file downloaded now by its hash.
download_torch_cpu() {
  local wheel version
  pip_download --no-deps --index-url "$torch_index_url" "torch==$torch_version" \
    -d .cache/torch-wheels
  wheel=$(ls .cache/torch-wheels/torch-*.whl)
  version=${wheel#.cache/torch-wheels/torch-}
  echo "torch==${version%%-*} --hash=sha256:$(sha256sum "$wheel" | cut -d' ' -f1)" \
    >.cache/torch-wheels/torch.txt
}

download_torch_pypi() {
  pip_download --no-deps --require-hashes -r "$torch_request" -d .cache/torch-wheels
  cp "$torch_request" .cache/torch-wheels/torch.txt
}

torch_wheelhouse() {
  local source stamp
  source=$(torch_source)
  torch_version=$(lock_export --extra train --no-hashes | sed -n 's/^torch==\([^ ;]*\).*/\1/p')
  if [ "$source" = cpu ]; then
    echo "torch==$torch_version from $torch_index_url" >"$torch_request"
  else
    # Not the CUDA libraries that `import torch` leaves alone: triton, cusolver (loaded on the
    # first CUDA linear algebra), nvtx (optional), cccl (headers), the Python CUDA bindings.
    local keep='^(torch|nvidia-[a-z0-9-]*)=='
    local skip='^(nvidia-cusolver|nvidia-nvtx|nvidia-cuda-cccl)=='
    lock_export --extra train \
      | awk -v keep="$keep" -v skip="$skip" '/^[a-z]/ { p = ($0 ~ keep) && ($0 !~ skip) } p' \
      | for_any_python311 >"$torch_request"
  fi
  say "torch $torch_version: $source"
  stamp=$(cat "$torch_request" <(echo "$source $arch") | sha256sum | cut -d' ' -f1)
  fill_wheelhouse .cache/torch-wheels .cache/images/torch-wheels.stamp "$stamp" \
    "download_torch_$source"
}

# 4. The images.
build_image() {
  local name=$1 dockerfile=$2 tag="model-trainer/$1:$version" epoch revision
  epoch=$(git log -1 --format=%ct 2>/dev/null || echo 315532800)
  revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
  local args=(
    --network none -f "$dockerfile" -t "$tag"
    --build-arg "BASE_IMAGE=$base_image" --build-arg OFFLINE=1
    --build-arg "VERSION=$version" --build-arg "REVISION=$revision"
    --build-arg "SOURCE_DATE_EPOCH=$epoch"
    --build-arg "CREATED=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"
    --build-arg "SOURCE=$(git remote get-url origin 2>/dev/null || true)"
  )
  if [ "$DOCKER_BUILDKIT" = 1 ]; then args+=(--progress plain); else args+=(--force-rm); fi
  local previous
  previous=$("$DOCKER" image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
  if ! DOCKER_BUILDKIT=$DOCKER_BUILDKIT "$DOCKER" build "${args[@]}" . \
    >".cache/images/build-$name.log" 2>&1; then
    tail -40 ".cache/images/build-$name.log" >&2
    say "building $tag failed; the log is .cache/images/build-$name.log"
    return 1
  fi
  # The image that the tag named before, gigabytes for the trainer, unless a container uses it.
  local current
  current=$("$DOCKER" image inspect --format '{{.Id}}' "$tag")
  if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    "$DOCKER" rmi "$previous" >/dev/null 2>&1 || true
  fi
}

total=$SECONDS
step "docker engine" docker_engine
# `images.sh --engine`: only make sure an engine runs (CI asks this before it opts in to the
# image tests, so that a machine without Docker skips them and a broken build still fails).
if [ "${1:-}" = "--engine" ]; then exit 0; fi
choose_builder
say "client $DOCKER, BuildKit=$DOCKER_BUILDKIT"
# 2. The base image: the Dockerfiles' default (the official Python image) where a registry
# answers, else our own, made with debootstrap.
official_base=$(dockerfile_arg BASE_IMAGE)
if [ -z "${MT_BASE_IMAGE:-}" ]; then
  if "$DOCKER" image inspect "$official_base" >/dev/null 2>&1 \
    || timeout 300 "$DOCKER" pull -q "$official_base" >/dev/null 2>&1; then
    base_image=$official_base
  else
    say "$official_base cannot be pulled: building $base_image with debootstrap"
    step "base image $base_image" env DOCKER="$DOCKER" bash scripts/base_image.sh "$base_image"
  fi
fi
step "wheelhouse" common_wheelhouse
step "torch wheelhouse" torch_wheelhouse
step "operator image" build_image operator operator/Dockerfile
step "trainer image" build_image trainer trainer_image/Dockerfile
# A rebuilt trainer leaves gigabytes of build cache behind; on the engine that it started, the
# script keeps only the newest.
engine_pid=$(cat .cache/docker/dockerd.pid 2>/dev/null || true)
if [ -n "$engine_pid" ] && [ "$(cat "/proc/$engine_pid/comm" 2>/dev/null)" = dockerd ] \
  && [ "$DOCKER_BUILDKIT" = 1 ]; then
  "$DOCKER" builder prune -f --keep-storage "${MT_BUILD_CACHE_KEEP:-12GB}" >/dev/null
  "$DOCKER" image prune -f >/dev/null
fi
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}\t{{.Size}}' "model-trainer/*" >&2
say "total: $((SECONDS - total))s"
