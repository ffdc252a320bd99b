// The pod sandbox's "pause" process for the test node's containerd (sandbox_image), so the
// suite needs no registry: it holds the pod's namespaces, reaps zombies (it is PID 1 when the
// pod shares its PID namespace) and exits on SIGINT/SIGTERM, like the upstream C pause.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for sig := range signals {
		if sig == syscall.SIGCHLD {
			for {
				pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
