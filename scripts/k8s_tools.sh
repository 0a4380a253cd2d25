#!/usr/bin/env bash
# Build the test control plane's binaries (etcd, kube-apiserver, kubectl) from tools/k8s, at the
# versions that tools/k8s/go.mod pins, and print the directory that holds them.
# With KUBEBUILDER_ASSETS pointing at a directory with etcd and kube-apiserver, print that instead.
# Idempotent; prints at once when the binaries are there already.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

if [ -n "${KUBEBUILDER_ASSETS:-}" ] \
  && [ -x "$KUBEBUILDER_ASSETS/etcd" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ]; then
  echo "$KUBEBUILDER_ASSETS"
  exit 0
fi

module="$root/tools/k8s"
version="$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$module/go.mod")"
if [ -z "$version" ]; then
  echo "k8s_tools: no k8s.io/kubernetes requirement in $module/go.mod" >&2
  exit 1
fi
bin="$root/.tools/k8s-$version/bin"
# What `kube-apiserver --version` and the /version endpoint report; `go build` alone says v0.0.0.
major="${version#v}"
minor="${major#*.}"
major="${major%%.*}"
minor="${minor%%.*}"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean"
done
# go.mod pins etcd too: a changed go.mod (or build flags) under the same version rebuilds as well.
stamp="$( (cat "$module/go.mod"; echo "$ldflags") | sha256sum | cut -c1-16)"
targets=(etcd kube-apiserver kubectl)
packages=(./cmd/etcd k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl)

missing() {
  [ "$(cat "$bin/.go.mod.sha256" 2>/dev/null)" = "$stamp" ] || { echo "${packages[@]}"; return; }
  for i in "${!targets[@]}"; do
    [ -x "$bin/${targets[$i]}" ] || echo "${packages[$i]}"
  done
}

if [ -z "$(missing)" ]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$bin"
# One build at a time: parallel callers wait for it and then find the binaries.
exec 9>"$bin/.lock"
flock 9
todo="$(missing)"
if [ -n "$todo" ]; then
  if ! command -v go >/dev/null 2>&1; then export PATH="$PATH:/usr/local/go/bin"; fi
  if ! command -v go >/dev/null 2>&1; then
    echo "k8s_tools: Go is needed to build etcd and kube-apiserver (https://go.dev/dl/)" >&2
    exit 1
  fi
  [ "$(cat "$bin/.go.mod.sha256" 2>/dev/null)" = "$stamp" ] || rm -f "${targets[@]/#/$bin/}"
  echo "k8s_tools: building ${todo//$'\n'/ } for Kubernetes $version (takes minutes once)" >&2
  staging="$(mktemp -d "$bin/.build.XXXXXX")"
  trap 'rm -rf "$staging"' EXIT
  # shellcheck disable=SC2086 # $todo is a list of package paths
  (cd "$module" && GOFLAGS=-mod=mod go build -trimpath -ldflags "$ldflags" -o "$staging/" $todo)
  mv "$staging"/* "$bin/"
  echo "$stamp" >"$bin/.go.mod.sha256"
fi
echo "$bin"
