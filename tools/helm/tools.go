//go:build tools

// Package tools pins the Helm CLI that `scripts/helm_tool.sh` builds for `make lint`,
// `make manifests` and the chart tests.
package tools

import _ "helm.sh/helm/v4/cmd/helm"
