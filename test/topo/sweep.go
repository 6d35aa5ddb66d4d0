package topo

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// A topology's owner file (ownerDir/<id>) holds the PID and start time of
// the process that built it, written before its first namespace. Close
// removes it. A process that dies without Close (a panicking test, a
// -timeout, SIGKILL) leaves its namespaces and bpffs mounts behind; the
// next New removes every topology whose owner is gone. Topologies without
// an owner file (built by an older checkout, or by something else) are
// left alone.
var ownerDir = "/run/lbctl-test"

var nsName = regexp.MustCompile(`^lbt-([0-9a-f]{6})-`)

// owner identifies a process: its PID and its start time in clock ticks
// since boot (/proc/PID/stat field 22), so that a reused PID is not taken
// for the owner.
type owner struct {
	pid   int
	start string
}

func (o owner) String() string { return fmt.Sprintf("%d %s", o.pid, o.start) }

func procStart(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	// The command name (field 2) may hold spaces and parentheses: count
	// fields after its closing parenthesis.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return "", fmt.Errorf("parse /proc/%d/stat", pid)
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 { // state is field 3, starttime field 22
		return "", fmt.Errorf("parse /proc/%d/stat", pid)
	}
	return f[19], nil
}

func self() (owner, error) {
	start, err := procStart(os.Getpid())
	if err != nil {
		return owner{}, fmt.Errorf("own start time: %w", err)
	}
	return owner{pid: os.Getpid(), start: start}, nil
}

// alive reports whether the process the owner file of id names still runs.
// ok is false when there is no readable owner file.
func alive(id string) (live, ok bool) {
	b, err := os.ReadFile(filepath.Join(ownerDir, id))
	if err != nil {
		return false, false
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return false, false
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil {
		return false, false
	}
	start, err := procStart(pid)
	return err == nil && start == f[1], true
}

func writeOwner(id string) error {
	o, err := self()
	if err != nil {
		return err
	}
	if err := os.MkdirAll(ownerDir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(ownerDir, id), []byte(o.String()+"\n"), 0o644)
}

// Sweep removes the namespaces and bpffs mounts of every topology whose
// owner process has exited, and returns the ids it removed.
func Sweep() ([]string, error) {
	entries, err := os.ReadDir("/run/netns")
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list namespaces: %w", err)
	}
	stale := map[string][]string{}
	for _, e := range entries {
		m := nsName.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		if live, ok := alive(m[1]); ok && !live {
			stale[m[1]] = append(stale[m[1]], e.Name())
		}
	}
	var ids []string
	var errs []error
	for id, names := range stale {
		for _, ns := range names {
			if err := ip("netns", "del", ns); err != nil {
				errs = append(errs, err)
			}
		}
		mounts, _ := filepath.Glob(filepath.Join(os.TempDir(), "lbt-"+id+"-*-bpffs-*"))
		for _, dir := range mounts {
			if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
				errs = append(errs, fmt.Errorf("unmount %s: %w", dir, err))
			}
			_ = os.Remove(dir)
		}
		_ = os.Remove(filepath.Join(ownerDir, id))
		ids = append(ids, id)
	}
	return ids, errors.Join(errs...)
}
