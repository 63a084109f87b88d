// etcd built from its server module: the upstream main module carries local replace directives,
// so `go install` of it fails; this wrapper is the whole program.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
