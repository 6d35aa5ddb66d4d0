package dataplane

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// ensureBPFFS makes sure root is on a bpffs, mounting one there if not.
func ensureBPFFS(root string, log *zap.Logger) error {
	if err := os.MkdirAll(root, 0o755); err != nil {
		return fmt.Errorf("create bpffs root %s: %w", root, privHint(err))
	}
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err != nil {
		return fmt.Errorf("statfs %s: %w", root, err)
	}
	if st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := unix.Mount("bpffs", root, "bpf", 0, "mode=0700"); err != nil {
		fix := fmt.Sprintf("mount one yourself (mount -t bpf bpffs %s) or pass --bpffs DIR naming a mounted bpffs", root)
		if errors.Is(err, unix.EPERM) {
			fix = "mounting needs CAP_SYS_ADMIN: run as root, " + fix
		}
		return fmt.Errorf("mount bpffs at %s: %w: %s", root, err, fix)
	}
	if private, err := privateMountNS(); err == nil && private {
		msg := "mounted a bpffs in a private mount namespace: lbctl's pinned state (programs, rules, counters) will vanish when this command exits; pass --bpffs DIR naming a bpffs mounted in the root mount namespace"
		if under(root, "/sys") {
			msg = "mounted a bpffs at " + root + " inside a private mount namespace with its own /sys (as `ip netns exec` gives): lbctl's pinned state (programs, rules, counters) will vanish when this command exits; pass --bpffs DIR naming a bpffs mounted in the root mount namespace (e.g. under /run)"
		}
		log.Warn(msg, zap.String("bpffs", root))
	}
	return nil
}

// privateMountNS reports whether this process lives in another mount
// namespace than PID 1, or (where PID 1's namespace cannot be read, as in
// some sandboxes) than one of its ancestors: mounts made here then vanish
// with the namespace, as under `ip netns exec`.
func privateMountNS() (bool, error) {
	self, err := os.Readlink("/proc/thread-self/ns/mnt")
	if err != nil {
		return false, err
	}
	if init, err := os.Readlink("/proc/1/ns/mnt"); err == nil {
		return self != init, nil
	}
	pid := os.Getppid()
	for i := 0; i < 64 && pid > 1; i++ {
		if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid)); err == nil && ns != self {
			return true, nil
		}
		ppid, err := parentPID(pid)
		if err != nil {
			break
		}
		pid = ppid
	}
	return false, nil
}

// parentPID reads the parent of pid from /proc/PID/stat.
func parentPID(pid int) (int, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// pid (comm) state ppid ...; comm may contain spaces and parentheses.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0, fmt.Errorf("parse /proc/%d/stat", pid)
	}
	var state byte
	var ppid int
	if _, err := fmt.Sscanf(string(b[i+1:]), " %c %d", &state, &ppid); err != nil {
		return 0, fmt.Errorf("parse /proc/%d/stat: %w", pid, err)
	}
	return ppid, nil
}

func under(path, dir string) bool {
	rel, err := filepath.Rel(dir, filepath.Clean(path))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, "../")
}
