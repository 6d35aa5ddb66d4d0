package topo

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/lbctl/lbctl/test/testenv"
)

// TestMain doubles as TestSweep's process that dies without Close: with
// LBCTL_TOPO_ORPHAN=1 it builds a topology, prints its id and exits.
func TestMain(m *testing.M) {
	if os.Getenv("LBCTL_TOPO_ORPHAN") == "1" {
		tp, err := New(Options{Backends: 1})
		if err != nil {
			fmt.Println("ERROR", err)
			os.Exit(1)
		}
		fmt.Println("ID", tp.ID)
		os.Exit(0) // no Close: what a panic or a -timeout does
	}
	os.Exit(m.Run())
}

func namespaces(t *testing.T, id string) []string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		t.Fatal(err)
	}
	var ns []string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], "lbt-"+id+"-") {
			ns = append(ns, f[0])
		}
	}
	return ns
}

// TestSweep: the topology of a process that exited without Close is
// removed by Sweep (namespaces, bpffs mounts, owner file); a live
// topology and a namespace without an owner file are left alone.
func TestSweep(t *testing.T) {
	testenv.RequireRoot(t)
	live := Start(t, Options{Backends: 1})

	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "LBCTL_TOPO_ORPHAN=1")
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("helper process: %v\n%s", err, out)
	}
	var id string
	for _, l := range strings.Split(string(out), "\n") {
		if rest, ok := strings.CutPrefix(l, "ID "); ok {
			id = rest
		}
	}
	if id == "" {
		t.Fatalf("helper process printed no topology id:\n%s", out)
	}
	if len(namespaces(t, id)) == 0 {
		t.Fatalf("the helper's topology %s has no namespace before the sweep", id)
	}
	mounts, _ := filepath.Glob(filepath.Join(os.TempDir(), "lbt-"+id+"-*-bpffs-*"))
	if len(mounts) == 0 {
		t.Fatalf("the helper's topology %s has no bpffs before the sweep", id)
	}

	// A namespace that looks like ours but has no owner file.
	b := make([]byte, 3)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	foreign := "lbt-" + hex.EncodeToString(b) + "-foreign"
	if err := ip("netns", "add", foreign); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = ip("netns", "del", foreign) })

	ids, err := Sweep()
	if err != nil {
		t.Fatalf("sweep: %v", err)
	}
	if !slices.Contains(ids, id) {
		t.Errorf("sweep removed %q, want it to include %s", ids, id)
	}
	if left := namespaces(t, id); len(left) > 0 {
		t.Errorf("namespaces of the exited process's topology left after the sweep: %q", left)
	}
	for _, m := range mounts {
		if _, err := os.Stat(m); !os.IsNotExist(err) {
			t.Errorf("bpffs %s left after the sweep (stat: %v)", m, err)
		}
	}
	if _, err := os.Stat(filepath.Join(ownerDir, id)); !os.IsNotExist(err) {
		t.Errorf("owner file of %s left after the sweep (stat: %v)", id, err)
	}
	if got := namespaces(t, live.ID); len(got) != len(live.Hosts()) {
		t.Errorf("the live topology %s has %d namespaces after the sweep, want %d", live.ID, len(got), len(live.Hosts()))
	}
	if slices.Contains(ids, live.ID) {
		t.Errorf("sweep removed the live topology %s", live.ID)
	}
	if ns := namespaces(t, foreign[4:10]); len(ns) != 1 {
		t.Errorf("the namespace without owner file %s was removed", foreign)
	}
}
