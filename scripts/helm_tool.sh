#!/usr/bin/env bash
# Build the Helm CLI pinned by tools/helm/go.mod into .tools/helm-<version>/bin and print its path.
# With HELM pointing at an executable, print that instead. Idempotent and quick once built.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

if [ -n "${HELM:-}" ] && [ -x "$HELM" ]; then
  echo "$HELM"
  exit 0
fi

module="$root/tools/helm"
version="$(grep -oP 'helm\.sh/helm/v4 \Kv[^ ]+' "$module/go.mod" | head -1)"
if [ -z "$version" ]; then
  echo "helm_tool: no helm.sh/helm/v4 requirement in $module/go.mod" >&2
  exit 1
fi
bin="$root/.tools/helm-$version/bin"
ldflags="-s -w -X helm.sh/helm/v4/internal/version.version=$version"
ldflags+=" -X helm.sh/helm/v4/internal/version.gitTreeState=clean"
stamp="$( (cat "$module/go.mod" "$module/go.sum"; echo "$ldflags") | sha256sum | cut -c1-16)"
if [ -x "$bin/helm" ] && [ "$(cat "$bin/.stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "$bin/helm"
  exit 0
fi

mkdir -p "$bin"
exec 9>"$bin/.lock"
flock 9
if ! [ -x "$bin/helm" ] || [ "$(cat "$bin/.stamp" 2>/dev/null)" != "$stamp" ]; then
  if ! command -v go >/dev/null 2>&1; then export PATH="$PATH:/usr/local/go/bin"; fi
  if ! command -v go >/dev/null 2>&1; then
    echo "helm_tool: Go is needed to build helm (https://go.dev/dl/)" >&2
    exit 1
  fi
  echo "helm_tool: building helm $version (takes a minute or two once)" >&2
  staging="$(mktemp -d "$bin/.build.XXXXXX")"
  trap 'rm -rf "$staging"' EXIT
  (cd "$module" && go build -trimpath -ldflags "$ldflags" -o "$staging/helm" helm.sh/helm/v4/cmd/helm)
  mv "$staging/helm" "$bin/helm"
  echo "$stamp" >"$bin/.stamp"
fi
echo "$bin/helm"
