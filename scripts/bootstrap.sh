#!/usr/bin/env bash
# Install what the project needs on a fresh Debian machine: uv, redis-server, openssl, the locked
# venv, and the test control plane's etcd and kube-apiserver (built with Go).
# Idempotent; fast when everything is there already.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=""
need_apt() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "bootstrap: installing redis-server" >&2
  need_apt redis-server
fi

if ! command -v openssl >/dev/null 2>&1; then
  echo "bootstrap: installing openssl" >&2
  need_apt openssl
fi

if ! command -v uv >/dev/null 2>&1 && ! python3 -m uv --version >/dev/null 2>&1; then
  echo "bootstrap: installing uv" >&2
  python3 -m pip install --quiet --disable-pip-version-check "uv>=0.5,<1" \
    || python3 -m pip install --quiet --break-system-packages "uv>=0.5,<1"
fi

# pip may put uv where PATH (or a pyenv shim) does not reach yet; `python3 -m uv` always works.
if command -v uv >/dev/null 2>&1; then uv=(uv); else uv=(python3 -m uv); fi
"${uv[@]}" sync --frozen --all-extras --quiet

# The k8s and chart tests run against a real etcd and kube-apiserver, and Helm, all built from
# Go modules (`--k8s`); CI machines have Go in /usr/local/go. The demo does not need them.
if [ "${1:-}" = "--k8s" ]; then
  command -v go >/dev/null 2>&1 || export PATH="$PATH:/usr/local/go/bin"
  bash scripts/k8s_tools.sh >/dev/null
  bash scripts/helm_tool.sh >/dev/null
fi
