// Thin wrapper that builds the etcd server from go.etcd.io/etcd/server/v3
// (the same entry point as upstream etcd's main package, Apache-2.0, The etcd Authors).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
