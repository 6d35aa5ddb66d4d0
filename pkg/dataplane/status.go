package dataplane

import (
	"fmt"
	"path/filepath"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
)

// AttachmentInfo is an attachment with the kernel's ids, so that bpftool
// output can be matched to it (bpftool 7.1 shows a tcx link only as
// "type 11").
type AttachmentInfo struct {
	Attachment
	Hook        string `json:"hook"`              // tc egress | tc ingress | xdp
	ProgramID   uint32 `json:"program_id"`        // bpftool prog show id N
	ProgramName string `json:"program_name"`      // the kernel's (truncated) name
	LinkID      uint32 `json:"link_id,omitempty"` // bpftool link show id N (tcx only)
}

// AttachmentInfos lists what lbctl attached, with program and link ids.
func (d *Dataplane) AttachmentInfos() ([]AttachmentInfo, error) {
	as, err := d.Attachments()
	if err != nil {
		return nil, err
	}
	out := make([]AttachmentInfo, 0, len(as))
	for _, a := range as {
		ai := AttachmentInfo{Attachment: a, Hook: hookOf(a.Program)}
		pin := filepath.Join(d.linkDir(a.Interface), a.Program)
		var progID ebpf.ProgramID
		if mode, ok := strings.CutPrefix(string(a.Method), "xdp-"); ok {
			pin = filepath.Join(d.linkDir(a.Interface), XDPMode(mode).pinName())
			ai.Hook = "xdp " + mode
		}
		if a.Method == MethodTCX || strings.HasPrefix(string(a.Method), "xdp-") {
			l, err := link.LoadPinnedLink(pin, nil)
			if err != nil {
				return nil, fmt.Errorf("load pinned link %s: %w", pin, privHint(err))
			}
			info, err := l.Info()
			l.Close()
			if err != nil {
				return nil, fmt.Errorf("link info %s: %w", pin, err)
			}
			ai.LinkID, progID = uint32(info.ID), info.Program
		} else {
			p, err := ebpf.LoadPinnedProgram(pin+"_cls", nil)
			if err != nil {
				return nil, fmt.Errorf("load pinned program %s_cls: %w", pin, privHint(err))
			}
			info, err := p.Info()
			p.Close()
			if err != nil {
				return nil, fmt.Errorf("program info %s_cls: %w", pin, err)
			}
			progID, _ = info.ID()
		}
		ai.ProgramID = uint32(progID)
		if p, err := ebpf.NewProgramFromID(progID); err == nil {
			if info, err := p.Info(); err == nil {
				ai.ProgramName = info.Name
			}
			p.Close()
		}
		out = append(out, ai)
	}
	return out, nil
}

// hookOf names where a program runs.
func hookOf(program string) string {
	for _, p := range tcProgs {
		if p.name == program {
			if p.egress {
				return "tc egress"
			}
			return "tc ingress"
		}
	}
	return program
}
