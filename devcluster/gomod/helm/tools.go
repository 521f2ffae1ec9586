//go:build tools

// Package tools pins the Helm module so `go build helm.sh/helm/v3/cmd/helm` builds the helm binary.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
