// Thin wrapper so the upstream command can be built from this module
// (k8s.io/kubernetes is not meant to be `go install`ed directly). Mirrors the
// upstream main.go of the same name (Apache-2.0, The Kubernetes Authors).
package main

import (
	"os"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-proxy/app"
)

func main() {
	os.Exit(cli.Run(app.NewProxyCommand()))
}
