#!/bin/sh
# The builder stage of trainer_image/Dockerfile and operator/Dockerfile runs this to make the
# final stage's one layer, /rootfs:
#   image_builder.sh deps EXTRA       /opt/venv with exactly the locked dependencies of the extra,
#                                     hashes checked
#   image_builder.sh project [DIR]    the project's wheel into it (built from /src by hatchling),
#                                     the user 10001 in passwd and group, each DIR owned by it
# The build args arrive as environment variables: OFFLINE=1 takes every wheel from /wheels (which
# scripts/images.sh fills) and never touches the network; INDEX_URL, TORCH_INDEX_URL, UV_VERSION,
# HATCHLING_VERSION and SOURCE_DATE_EPOCH (project step only) are described in the Dockerfiles.
set -eu

ROOTFS=/rootfs
VENV=/opt/venv
UV=/usr/local/uv/bin/uv
WHEELS=/wheels

if [ "${OFFLINE:-0}" = 1 ]; then
  sources="--offline --no-index --find-links $WHEELS"
else
  sources="--index-url $INDEX_URL"
fi

install() {
  "$UV" pip install --quiet --python "$VENV/bin/python" --no-deps "$@"
}

# The lock's requirements of one extra, without the project itself: `uv export` takes more options.
export_lock() {
  extra=$1
  shift
  (cd /src && "$UV" export --frozen --no-dev --extra "$extra" --no-emit-project --no-header \
    --no-annotate "$@")
}

# The timestamp of the dependencies' files: fixed, so that their layer depends on the lock alone
# and stays cached from one commit to the next (1980-01-01, the earliest a zip can hold).
DEPS_EPOCH=315532800

# Make the files under /rootfs that changed since the start of this step (by ctime, which no one
# sets) depend on the inputs alone: no bytecode, no note of when uv installed them, and the
# timestamp $1. Files of an earlier step stay as they are, so this step's layer does not copy them.
settle() {
  find "$ROOTFS" -depth -name __pycache__ -type d -exec rm -rf {} +
  find "$ROOTFS" -path '*.dist-info/uv_cache.json' | while read -r note; do
    rm "$note"
    sed -i '/\.dist-info\/uv_cache\.json,/d' "${note%/uv_cache.json}/RECORD"
  done
  find "$ROOTFS" -cnewer /tmp/step-start -exec touch -h -d "@$1" {} +
}

deps() {
  extra=$1
  touch /tmp/step-start
  python3 -m venv /usr/local/uv
  if [ "${OFFLINE:-0}" = 1 ]; then
    /usr/local/uv/bin/pip install --quiet --no-index --find-links "$WHEELS" "uv==$UV_VERSION"
  else
    /usr/local/uv/bin/pip install --quiet --index-url "$INDEX_URL" "uv==$UV_VERSION"
  fi
  # The final stage copies /rootfs whole, since a copy of a tree keeps its timestamps. /opt is a
  # link into it, so that the venv is made where it will run and never moved.
  mkdir -p "$ROOTFS/opt"
  rmdir /opt
  ln -s "$ROOTFS/opt" /opt
  python3 -m venv --without-pip "$VENV"

  # torch comes on its own: the lock's PyPI build of it needs about 3 GB of CUDA libraries and
  # triton, which the CPU build from TORCH_INDEX_URL (or the wheelhouse's torch.txt) does without.
  separate=""
  if [ "${OFFLINE:-0}" = 1 ] || [ "${TORCH_INDEX_URL:-locked}" != locked ]; then
    separate=$(export_lock "$extra" --no-hashes \
      | sed -n 's/^\(torch\|triton\|nvidia-[a-z0-9-]*\|cuda-[a-z0-9-]*\)==.*/\1/p')
  fi
  no_emit=""
  for name in $separate; do no_emit="$no_emit --no-emit-package $name"; done
  # shellcheck disable=SC2086 # $no_emit and $sources are lists of options
  export_lock "$extra" $no_emit >/tmp/requirements.txt
  # shellcheck disable=SC2086
  install --require-hashes $sources -r /tmp/requirements.txt

  if [ -n "$separate" ]; then
    if [ "${OFFLINE:-0}" = 1 ]; then
      # shellcheck disable=SC2086
      install --require-hashes $sources -r "$WHEELS/torch.txt"
    else
      version=$(export_lock "$extra" --no-hashes | sed -n 's/^torch==\([^ ;]*\).*/\1/p')
      install --index-url "$TORCH_INDEX_URL" "torch==$version"
    fi
    "$VENV/bin/python" -c 'import torch; assert (torch.ones(2) @ torch.ones(2)).item() == 2.0'
  fi
  settle "$DEPS_EPOCH"
}

project() {
  touch /tmp/step-start
  printf 'hatchling==%s\n' "$HATCHLING_VERSION" >/tmp/build-constraints.txt
  # shellcheck disable=SC2086
  "$UV" build --quiet --wheel --out-dir /tmp/dist --build-constraints /tmp/build-constraints.txt \
    $sources /src
  # shellcheck disable=SC2086
  install $sources /tmp/dist/*.whl
  "$VENV/bin/model-trainer" --version >/dev/null

  mkdir -p "$ROOTFS/etc"
  cp /etc/passwd /etc/group "$ROOTFS/etc/"
  echo 'model-trainer:x:10001:10001:model-trainer:/tmp:/usr/sbin/nologin' >>"$ROOTFS/etc/passwd"
  echo 'model-trainer:x:10001:' >>"$ROOTFS/etc/group"
  for dir in "$@"; do
    mkdir -p "$ROOTFS$dir"
    chown 10001:10001 "$ROOTFS$dir"
  done
  settle "$SOURCE_DATE_EPOCH"
}

case "${1:-}" in
  deps) deps "$2" ;;
  project)
    shift
    project "$@"
    ;;
  *)
    echo "usage: image_builder.sh deps EXTRA | project [DIR...]" >&2
    exit 2
    ;;
esac
