package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// The binaries end-to-end tests run in the namespaces, built once per test
// process from this checkout.
var bins struct {
	once sync.Once
	dir  string
	err  error
}

var binPkgs = map[string]string{
	"lbctl":   "github.com/lbctl/lbctl/cmd/lbctl",
	"backend": "github.com/lbctl/lbctl/test/backend",
}

// Binary returns the path of "lbctl" or "backend", building both with
// `go build` into a temporary directory on first use. A TestMain calling it
// removes them with RemoveBinaries.
func Binary(t testing.TB, name string) string {
	t.Helper()
	if _, ok := binPkgs[name]; !ok {
		t.Fatalf("testenv.Binary: unknown binary %q", name)
	}
	bins.once.Do(func() {
		if _, err := exec.LookPath("go"); err != nil {
			bins.err = fmt.Errorf("the go tool is needed to build lbctl for the end-to-end tests: %w", err)
			return
		}
		bins.dir, bins.err = os.MkdirTemp("", "lbctl-e2e-bin-")
		if bins.err != nil {
			return
		}
		for out, pkg := range binPkgs {
			cmd := exec.Command("go", "build", "-o", filepath.Join(bins.dir, out), pkg)
			cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
			if b, err := cmd.CombinedOutput(); err != nil {
				bins.err = fmt.Errorf("go build %s: %w\n%s", pkg, err, b)
				return
			}
		}
	})
	if bins.err != nil {
		t.Fatal(bins.err)
	}
	return filepath.Join(bins.dir, name)
}

// RemoveBinaries deletes what Binary built.
func RemoveBinaries() {
	if bins.dir != "" {
		_ = os.RemoveAll(bins.dir)
	}
}
