package netconf

import (
	"errors"
	"fmt"
	"hash/fnv"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// clsPriority is the cls_bpf filter priority lbctl uses; with the filter
// name it identifies lbctl's filters among others on the same hook.
const clsPriority = 0xc0de

// clsHandle is the filter handle of lbctl's cls_bpf filter called name:
// one per program, so that two programs on one hook do not replace each other.
func clsHandle(name string) uint32 {
	h := fnv.New32a()
	_, _ = h.Write([]byte(name))
	return h.Sum32()%0xfffe + 1
}

// AttachClsBPF attaches the BPF program progFD to ifname's egress (or
// ingress) hook with a clsact qdisc (added if missing) and a direct-action
// cls_bpf filter named name, replacing lbctl's previous filter of that name.
// It is the fallback for kernels without tcx (before Linux 6.6).
func AttachClsBPF(ifname string, progFD int, name string, egress bool) error {
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("attach cls_bpf %s to %s: find interface: %w", name, ifname, err)
	}
	qdisc := &netlink.GenericQdisc{
		QdiscAttrs: netlink.QdiscAttrs{
			LinkIndex: l.Attrs().Index,
			Handle:    netlink.MakeHandle(0xffff, 0),
			Parent:    netlink.HANDLE_CLSACT,
		},
		QdiscType: "clsact",
	}
	if err := netlink.QdiscAdd(qdisc); err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("attach cls_bpf %s to %s: add clsact qdisc: %w", name, ifname, err)
	}
	f := clsFilter(l.Attrs().Index, name, egress)
	f.Fd = progFD
	f.DirectAction = true
	if err := netlink.FilterReplace(f); err != nil {
		return fmt.Errorf("attach cls_bpf %s to %s: add filter: %w", name, ifname, err)
	}
	return nil
}

// DetachClsBPF removes the cls_bpf filter name that AttachClsBPF added. The
// clsact qdisc stays: other filters may use it.
func DetachClsBPF(ifname, name string, egress bool) error {
	l, err := netlink.LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("detach cls_bpf %s from %s: find interface: %w", name, ifname, err)
	}
	parent := uint32(netlink.HANDLE_MIN_INGRESS)
	if egress {
		parent = netlink.HANDLE_MIN_EGRESS
	}
	filters, err := netlink.FilterList(l, parent)
	if err != nil {
		return fmt.Errorf("detach cls_bpf %s from %s: list filters: %w", name, ifname, err)
	}
	for _, f := range filters {
		bf, ok := f.(*netlink.BpfFilter)
		if !ok || bf.Priority != clsPriority || bf.Name != name {
			continue
		}
		if err := netlink.FilterDel(clsFilter(l.Attrs().Index, name, egress)); err != nil {
			return fmt.Errorf("detach cls_bpf %s from %s: %w", name, ifname, err)
		}
		return nil
	}
	return fmt.Errorf("detach cls_bpf %s from %s: no such filter", name, ifname)
}

func clsFilter(ifindex int, name string, egress bool) *netlink.BpfFilter {
	parent := uint32(netlink.HANDLE_MIN_INGRESS)
	if egress {
		parent = netlink.HANDLE_MIN_EGRESS
	}
	return &netlink.BpfFilter{
		FilterAttrs: netlink.FilterAttrs{
			LinkIndex: ifindex,
			Parent:    parent,
			Handle:    clsHandle(name),
			Priority:  clsPriority,
			Protocol:  unix.ETH_P_ALL,
		},
		Name: name,
	}
}
