// A small static multi-tool for pods on the test node (the image "morphml.test/testbox" has
// only this binary, the way busybox has one): the real-node tests use it to serve HTTP, fetch a
// URL, resolve a name and connect to a port from inside a pod.
//
//	testbox serve PORT BODY     HTTP server answering BODY on every path (and /hostname)
//	testbox get URL             print the response body; exit 1 on error or a non-2xx status
//	testbox resolve NAME        print the name's addresses, one a line; exit 1 if none
//	testbox connect HOST:PORT   exit 0 if a TCP connection opens within 3 s, else 1
//	testbox sleep SECONDS       sleep (SIGTERM ends it at once)
//	testbox echo WORDS...       print the words (and to stderr with "err:" in front)
//	testbox write PATH TEXT     create PATH with TEXT; exit 1 with the error (a read-only root)
//	testbox id                  print uid and gid
//	testbox alloc MEGABYTES     allocate and touch that much memory, then sleep
package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
	os.Exit(1)
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: testbox serve|get|resolve|connect|sleep|echo|write|id|alloc ...")
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "serve":
		if len(args) != 2 {
			fail("usage: testbox serve PORT BODY")
		}
		host, _ := os.Hostname()
		http.HandleFunc("/hostname", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, host) })
		http.HandleFunc("/", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, args[1]) })
		fmt.Println("serving on :" + args[0])
		fail("%v", http.ListenAndServe(":"+args[0], nil))
	case "get":
		if len(args) != 1 {
			fail("usage: testbox get URL")
		}
		client := http.Client{Timeout: 5 * time.Second}
		resp, err := client.Get(args[0])
		if err != nil {
			fail("get %s: %v", args[0], err)
		}
		body, _ := io.ReadAll(resp.Body)
		os.Stdout.Write(body)
		if resp.StatusCode/100 != 2 {
			fail("get %s: HTTP %d", args[0], resp.StatusCode)
		}
	case "resolve":
		if len(args) != 1 {
			fail("usage: testbox resolve NAME")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		addrs, err := net.DefaultResolver.LookupHost(ctx, args[0])
		if err != nil || len(addrs) == 0 {
			fail("resolve %s: %v", args[0], err)
		}
		fmt.Println(strings.Join(addrs, "\n"))
	case "connect":
		if len(args) != 1 {
			fail("usage: testbox connect HOST:PORT")
		}
		conn, err := net.DialTimeout("tcp", args[0], 3*time.Second)
		if err != nil {
			fail("connect %s: %v", args[0], err)
		}
		conn.Close()
		fmt.Println("connected to " + args[0])
	case "sleep":
		seconds := 3600.0
		if len(args) == 1 {
			seconds, _ = strconv.ParseFloat(args[0], 64)
		}
		signals := make(chan os.Signal, 1)
		signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
		select {
		case <-signals:
		case <-time.After(time.Duration(seconds * float64(time.Second))):
		}
	case "echo":
		fmt.Println(strings.Join(args, " "))
		fmt.Fprintln(os.Stderr, "err: "+strings.Join(args, " "))
	case "write":
		if len(args) != 2 {
			fail("usage: testbox write PATH TEXT")
		}
		if err := os.WriteFile(args[0], []byte(args[1]), 0o644); err != nil {
			fail("write %s: %v", args[0], err)
		}
		fmt.Println("wrote " + args[0])
	case "id":
		fmt.Printf("uid=%d gid=%d\n", os.Getuid(), os.Getgid())
	case "alloc":
		mb, _ := strconv.Atoi(args[0])
		chunks := make([][]byte, 0, mb)
		for i := 0; i < mb; i++ {
			chunk := make([]byte, 1<<20)
			for j := range chunk {
				chunk[j] = 1
			}
			chunks = append(chunks, chunk)
		}
		fmt.Printf("allocated %d MB\n", len(chunks))
		time.Sleep(time.Hour)
	default:
		fail("unknown command %q", os.Args[1])
	}
}
