#!/usr/bin/env bash
# Builds SeaweedFS's `weed` (master, volume, filer and S3 gateway in one binary) from the
# version pinned in this Go module into $1. Called by tests/s3server.py, which does the
# caching (by a hash of go.mod, go.sum and this script) and the locking.
set -euo pipefail
out=${1:?usage: build.sh OUTPUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$here"
# CGO off: a static binary, as SeaweedFS's own releases; -buildvcs=false: the binary does not
# depend on the state of the MorphML checkout.
CGO_ENABLED=0 go build -buildvcs=false -trimpath -ldflags "-s -w" -o "$out/weed" github.com/seaweedfs/seaweedfs/weed
