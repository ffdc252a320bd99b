#!/usr/bin/env bash
# Builds the test control plane binaries (kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, etcd, helm) from this Go module into $1.
# Versions come from versions.env (the one place they are pinned); the linker
# stamps them into the binaries so `kubectl version` / `helm version` / the API
# server's /version report the real release instead of "v0.0.0-master".
# Called by tests/cluster/build.py, which handles caching and locking.
set -euo pipefail
out=${1:?usage: build.sh OUTPUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC1091
. "$here/versions.env"
kv=${KUBERNETES_VERSION#v}
major=${kv%%.*}; rest=${kv#*.}; minor=${rest%%.*}
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
  ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
done
ldflags+=" -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION"
mkdir -p "$out"
cd "$here"
# One `go build` for all six so the shared packages compile once. -buildvcs=false: the
# binaries do not depend on the state of the MorphML checkout (and git may not be usable there).
CGO_ENABLED=0 go build -buildvcs=false -trimpath -ldflags "$ldflags" -o "$out/" ./cmd/...
