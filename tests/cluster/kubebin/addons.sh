#!/usr/bin/env bash
# Build the real node's add-ons into OUTPUT_DIR: kube-router (only its NetworkPolicy
# controller is run) with `go install` from its own module and go.mod, and CoreDNS from
# the small module in coredns/ (a main with just the plugins the cluster DNS needs).
# Called by tests/cluster/build.py (ensure_addons_built), which does the caching and locking.
set -euo pipefail
out=${1:?usage: addons.sh OUTPUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck disable=SC1091
. "$here/addons.env"
mkdir -p "$out"
out=$(cd "$out" && pwd)
export CGO_ENABLED=0 GOFLAGS=-buildvcs=false
cd "$here"
kr=github.com/cloudnativelabs/kube-router/v2
GOBIN="$out" go install -trimpath \
  -ldflags "-s -w -X $kr/pkg/version.Version=$KUBE_ROUTER_VERSION -X $kr/pkg/version.BuildDate=1970-01-01T00:00:00Z" \
  "$kr/cmd/kube-router@$KUBE_ROUTER_VERSION"
coredns_version=$(cd coredns && go list -m -f "{{.Version}}" github.com/coredns/coredns)
cd coredns
go build -trimpath -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$coredns_version" -o "$out/coredns" .
