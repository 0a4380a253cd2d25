#!/usr/bin/env bash
# The images' local base: a minimal Debian bookworm with python3 (3.11), python3-venv and
# ca-certificates, made by debootstrap from Debian's own packages (security updates applied) and
# imported into Docker, so that no container registry is needed. Like python:3.11-slim-bookworm,
# it has no compiler, no apt lists and no documentation.
#   scripts/base_image.sh [TAG]   (default model-trainer/base:bookworm; done if it exists)
# Env: DOCKER (the docker client), MT_DEBIAN_MIRROR, MT_DEBIAN_SECURITY_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."

tag=${1:-model-trainer/base:bookworm}
docker=${DOCKER:-docker}
mirror=${MT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${MT_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
work=.cache/base
rootfs=$work/rootfs

if "$docker" image inspect "$tag" >/dev/null 2>&1; then
  exit 0
fi

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "base_image: installing debootstrap" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends \
    debootstrap >/dev/null
fi

unmount_proc() {
  if mountpoint -q "$rootfs/proc"; then as_root umount "$rootfs/proc"; fi
}
trap unmount_proc EXIT

mkdir -p "$work"
unmount_proc
as_root rm -rf "$rootfs"
echo "base_image: debootstrap bookworm (log: $work/debootstrap.log)" >&2
as_root debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; exit 1; }

as_root tee "$rootfs/etc/apt/sources.list" >/dev/null <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb $security bookworm-security main
EOF
# Later `apt-get install`s in images built on this one stay small too.
as_root tee "$rootfs/etc/dpkg/dpkg.cfg.d/slim" >/dev/null <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
EOF
as_root tee "$rootfs/etc/apt/apt.conf.d/docker-clean" >/dev/null <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
EOF

echo "base_image: security updates" >&2
as_root mount -t proc proc "$rootfs/proc"
as_root chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  DEBIAN_FRONTEND=noninteractive \
  sh -c 'apt-get update -qq && apt-get upgrade -y -qq && apt-get clean' \
  >>"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
unmount_proc

# What a container never needs: package lists and caches, logs, documentation (copyright files
# stay), translations, bytecode, and the host's identity files that Docker provides at run time.
as_root sh -c "
  cd '$rootfs'
  rm -rf var/lib/apt/lists/* var/cache/apt/* var/cache/debconf/*-old var/lib/dpkg/*-old
  find var/log -type f -delete
  find usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
  find usr/share/doc -mindepth 1 -type d -empty -delete
  rm -rf usr/share/man/* usr/share/info/* usr/share/locale/* usr/share/groff/* usr/share/lintian/*
  find usr -depth -name __pycache__ -type d -exec rm -rf {} +
  rm -rf tmp/* var/tmp/* root/.cache
  rm -f etc/resolv.conf etc/hostname
  : > etc/machine-id
"

echo "base_image: docker import $tag" >&2
as_root tar --numeric-owner --sort=name --exclude='./dev/*' --exclude='./proc/*' \
  --exclude='./sys/*' -C "$rootfs" -cf - . \
  | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    --message "debootstrap --variant=minbase bookworm + python3 python3-venv ca-certificates" \
    - "$tag" >/dev/null
as_root rm -rf "$rootfs"
