package dataplane

import (
	"errors"
	"fmt"
	"math"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/features"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// Features says which attach points of lbctl's programs the kernel offers.
// A nil field means supported; otherwise the error says why not.
type Features struct {
	TCX error // tcx links (Linux 6.6+); without them lbctl falls back to clsact + cls_bpf
	XDP error // XDP programs attached through bpf links (Linux 5.9+)
}

// ProbeFeatures asks the kernel, without attaching anything: it loads a
// trivial program and creates a link on an interface index that cannot
// exist. ENODEV means the kernel understood the request.
func ProbeFeatures() Features {
	if err := rlimit.RemoveMemlock(); err != nil {
		err = fmt.Errorf("remove memlock limit: %w", privHint(err))
		return Features{TCX: err, XDP: err}
	}
	return Features{
		TCX: probeLink(ebpf.SchedCLS, func(p *ebpf.Program) error {
			_, err := link.AttachTCX(link.TCXOptions{Interface: math.MaxInt32, Program: p, Attach: ebpf.AttachTCXIngress})
			return err
		}),
		XDP: probeXDP(),
	}
}

// probeXDP: the kernel answers an XDP link on a missing interface with
// EINVAL, as it does a kernel without XDP links, so the program type is
// probed and the link support (Linux 5.9) read from the release.
func probeXDP() error {
	if err := features.HaveProgramType(ebpf.XDP); err != nil {
		return fmt.Errorf("program type XDP: %w", privHint(err))
	}
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return fmt.Errorf("uname: %w", err)
	}
	rel := unix.ByteSliceToString(u.Release[:])
	var major, minor int
	if _, err := fmt.Sscanf(rel, "%d.%d", &major, &minor); err != nil {
		return fmt.Errorf("parse kernel release %q: %w", rel, err)
	}
	if major < 5 || (major == 5 && minor < 9) {
		return fmt.Errorf("Linux %s has no XDP links (5.9+)", rel)
	}
	return nil
}

func probeLink(typ ebpf.ProgramType, attach func(*ebpf.Program) error) error {
	if err := features.HaveProgramType(typ); err != nil {
		return fmt.Errorf("program type %s: %w", typ, privHint(err))
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:         typ,
		License:      "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, 0), asm.Return()},
	})
	if err != nil {
		return fmt.Errorf("load probe program: %w", privHint(err))
	}
	defer prog.Close()
	err = attach(prog)
	switch {
	case err == nil:
		return errors.New("probe link on a nonexistent interface succeeded")
	case errors.Is(err, unix.ENODEV):
		return nil
	case errors.Is(err, ebpf.ErrNotSupported):
		return err
	}
	return privHint(err)
}

// Programs lists the programs this build of lbctl can attach, by the names
// Attachments uses.
func Programs() []string {
	var out []string
	for _, p := range tcProgs {
		out = append(out, p.name)
	}
	return append(out, "xdp_lb")
}
