// Package dataplane loads lbctl's BPF programs, attaches them to interfaces
// (tcx, or clsact + cls_bpf where the kernel lacks tcx), pins them and their
// maps under <root>/lbctl/ in a bpffs, and updates and reads those maps.
// It is the only package of lbctl that imports cilium/ebpf.
//
// Pinned layout (root defaults to /sys/fs/bpf):
//
//	<root>/lbctl/<map>                 maps shared by every interface (snat_rules, ...)
//	<root>/lbctl/links/<ifname>/snat     tcx link of the snat program on ifname
//	<root>/lbctl/links/<ifname>/snat_cls snat program attached with clsact + cls_bpf
//
// One Dataplane holds an exclusive flock on <root>/lbctl from Open to Close,
// so concurrent lbctl processes serialize their changes.
package dataplane

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"go.uber.org/zap"
	"golang.org/x/sys/unix"
)

// DefaultRoot is the bpffs under which lbctl pins its state by default.
const DefaultRoot = "/sys/fs/bpf"

var (
	// ErrTCXUnsupported: the kernel has no tcx (before 6.6) and no ClsBPF
	// fallback was given in Options.
	ErrTCXUnsupported = errors.New("kernel does not support tcx (needs Linux 6.6+)")
	// ErrNoState: Options.NoCreate was set and there is no pinned state.
	ErrNoState = errors.New("no pinned lbctl state")
	// ErrRuleExists: AddSNAT of a rule whose match is already taken.
	ErrRuleExists = errors.New("rule already exists")
	// ErrRuleNotFound: DelSNAT of a rule that does not exist.
	ErrRuleNotFound = errors.New("no such rule")
	// ErrUnknownInterface: the interface named does not exist.
	ErrUnknownInterface = errors.New("unknown interface")
)

// ClsBPF attaches a program with a clsact qdisc and a direct-action
// cls_bpf filter, for kernels without tcx. pkg/netconf implements it; the
// caller wires it in (this package imports no netlink).
type ClsBPF interface {
	AttachClsBPF(ifname string, progFD int, name string, egress bool) error
	DetachClsBPF(ifname, name string, egress bool) error
}

// Options configures Open.
type Options struct {
	// Root is the bpffs root; state lives in Root/lbctl. Default DefaultRoot.
	Root string
	// Log receives warnings (e.g. state that will not persist). Default: no-op.
	Log *zap.Logger
	// ClsBPF, when set, is used where the kernel lacks tcx.
	ClsBPF ClsBPF
	// ForceClsBPF attaches with ClsBPF even when tcx is available (tests).
	ForceClsBPF bool
	// NoCreate makes Open fail with ErrNoState instead of creating state
	// (for read-only commands such as snat list and stats).
	NoCreate bool
	// ReadOnly skips the state lock, so that readers (stats, status,
	// metrics, doctor) never wait for a daemon holding it. With it, only
	// reading methods may be called.
	ReadOnly bool
}

// Method is how a program was attached.
type Method string

const (
	MethodTCX    Method = "tcx"
	MethodClsBPF Method = "clsact+cls_bpf"
)

// Attachment is one program attached to one interface.
type Attachment struct {
	Interface string `json:"interface"`
	Program   string `json:"program"`
	Method    Method `json:"method"`
}

// Dataplane is an open handle on lbctl's pinned state.
type Dataplane struct {
	log      *zap.Logger
	dir      string // <root>/lbctl
	cls      ClsBPF
	forceCls bool
	lock     *os.File
	snat     snatMaps
	steer    steerMaps
	ruleIDs  *idAlloc // nil until first needed
	// rules of each kind (snat_rule_counts), valid once ruleIDs is set
	ruleCounts snatSnatKindCounts
	// IPv4 rules by kind (the flags of snat_rule_counts.kept), valid once
	// ruleIDs is set
	table4Counts table4Counts
	// the probed IPv4 rule table (snat_host4_slots); nil until synced,
	// or when it could not be (then not kept)
	host4    *host4Table
	host4Mem []byte    // snat_host4_slots mapped into memory (slotMem)
	xdpst    *xdpState // nil until XDP is first used (xdp.go)
	// snat_rewritten as this process last read or wrote it (keepRewritten)
	rewritten *snatSnatRewrittenBase
}

// Open mounts a bpffs at opts.Root if none is there, takes the state lock
// and loads (or adopts the pinned) maps.
func Open(opts Options) (*Dataplane, error) {
	if opts.Root == "" {
		opts.Root = DefaultRoot
	}
	if opts.Log == nil {
		opts.Log = zap.NewNop()
	}
	dir := filepath.Join(opts.Root, "lbctl")
	if opts.NoCreate {
		if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("open %s: %w", dir, ErrNoState)
		}
	}
	if err := ensureBPFFS(opts.Root, opts.Log); err != nil {
		return nil, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("remove memlock limit: %w", privHint(err))
	}
	if err := os.MkdirAll(filepath.Join(dir, "links"), 0o700); err != nil {
		return nil, fmt.Errorf("create %s: %w", dir, privHint(err))
	}
	var lock *os.File
	if !opts.ReadOnly {
		var err error
		if lock, err = os.Open(dir); err != nil {
			return nil, fmt.Errorf("open %s: %w", dir, err)
		}
		if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX); err != nil {
			lock.Close()
			return nil, fmt.Errorf("lock %s: %w", dir, err)
		}
	}
	d := &Dataplane{log: opts.Log, dir: dir, cls: opts.ClsBPF, forceCls: opts.ForceClsBPF, lock: lock}
	spec, _, err := d.snatSpec() // maps only: no program, no relocation
	if err != nil {
		d.Close()
		return nil, err
	}
	if err := spec.LoadAndAssign(&d.snat, d.collectionOptions()); err != nil {
		d.Close()
		return nil, loadErr("load snat maps", d.dir, err)
	}
	steer, err := d.steerSpec()
	if err != nil {
		d.Close()
		return nil, err
	}
	if err := steer.LoadAndAssign(&d.steer, d.collectionOptions()); err != nil {
		d.Close()
		return nil, loadErr("load steer maps", d.dir, err)
	}
	return d, nil
}

// Close releases the maps and the lock; pinned state stays.
func (d *Dataplane) Close() error {
	d.unmapSlots()
	d.snat.Close()
	d.closeXDP()
	d.steer.Close()
	if d.lock != nil {
		d.lock.Close() // releases the flock
		d.lock = nil
	}
	return nil
}

// Dir is the directory holding the pinned state (<root>/lbctl).
func (d *Dataplane) Dir() string { return d.dir }

func (d *Dataplane) collectionOptions() *ebpf.CollectionOptions {
	return &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: d.dir}}
}

// pinMaps marks every map of spec to be pinned by name, so that a later
// process adopts the pinned map instead of creating a new one.
func pinMaps(spec *ebpf.CollectionSpec) {
	for name, m := range spec.Maps {
		if !strings.HasPrefix(name, ".") { // not .bss, .rodata: per program
			m.Pinning = ebpf.PinByName
		}
	}
}

// loadErr wraps a load failure with the fix for the usual causes.
func loadErr(op, dir string, err error) error {
	var verr *ebpf.VerifierError
	switch {
	case errors.As(err, &verr):
		return fmt.Errorf("%s: verifier rejected the program: %+v", op, verr)
	case errors.Is(err, ebpf.ErrMapIncompatible):
		return fmt.Errorf("%s: %w: the maps pinned in %s come from another lbctl version; detach every interface (lbctl detach IFACE) or remove %s", op, err, dir, dir)
	}
	return fmt.Errorf("%s: %w", op, privHint(err))
}

// privHint adds the missing capability to permission errors.
func privHint(err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("%w (lbctl needs CAP_BPF and CAP_NET_ADMIN: run it as root)", err)
	}
	return err
}

// lookupInterface returns ifname's index, or an error listing the
// interfaces that exist.
func lookupInterface(ifname string) (int, error) {
	ifi, err := net.InterfaceByName(ifname)
	if err == nil {
		return ifi.Index, nil
	}
	var names []string
	if ifs, lerr := net.Interfaces(); lerr == nil {
		for _, i := range ifs {
			names = append(names, i.Name)
		}
	}
	sort.Strings(names)
	return 0, fmt.Errorf("%w %q (available: %s)", ErrUnknownInterface, ifname, strings.Join(names, ", "))
}

func (d *Dataplane) linkDir(ifname string) string { return filepath.Join(d.dir, "links", ifname) }

// tcProg describes one TC program for the shared attach code.
type tcProg struct {
	name   string // pin name and cls_bpf filter name suffix
	egress bool
}

func (p tcProg) tcxAttach() ebpf.AttachType {
	if p.egress {
		return ebpf.AttachTCXEgress
	}
	return ebpf.AttachTCXIngress
}

func (p tcProg) clsName() string { return "lbctl_" + p.name }

// attachTC attaches prog to ifname as p, replacing what lbctl attached
// there before (Link.Update keeps the tcx slot: no packet misses the program).
func (d *Dataplane) attachTC(ifname string, p tcProg, prog *ebpf.Program) (Method, error) {
	ifindex, err := lookupInterface(ifname)
	if err != nil {
		return "", err
	}
	dir := d.linkDir(ifname)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("create %s: %w", dir, err)
	}
	tcxPin := filepath.Join(dir, p.name)
	clsPin := filepath.Join(dir, p.name+"_cls")

	if !d.forceCls {
		err := d.attachTCX(ifindex, p, prog, tcxPin)
		if err == nil {
			// Moving from cls_bpf to tcx: drop the old attachment.
			if _, serr := os.Stat(clsPin); serr == nil {
				if err := d.detachCls(ifname, p, clsPin); err != nil {
					return "", err
				}
			}
			return MethodTCX, nil
		}
		if !errors.Is(err, ebpf.ErrNotSupported) {
			return "", fmt.Errorf("attach %s to %s with tcx: %w", p.name, ifname, privHint(err))
		}
		if d.cls == nil {
			return "", fmt.Errorf("attach %s to %s: %w", p.name, ifname, ErrTCXUnsupported)
		}
		d.log.Info("kernel lacks tcx, falling back to clsact + cls_bpf", zap.String("interface", ifname))
	}
	if d.cls == nil {
		return "", fmt.Errorf("attach %s to %s with cls_bpf: no cls_bpf attacher configured", p.name, ifname)
	}
	if err := d.cls.AttachClsBPF(ifname, prog.FD(), p.clsName(), p.egress); err != nil {
		return "", fmt.Errorf("attach %s to %s with cls_bpf: %w", p.name, ifname, privHint(err))
	}
	_ = os.Remove(clsPin) // re-attach: the filter now runs the new program
	if err := prog.Pin(clsPin); err != nil {
		return "", fmt.Errorf("pin %s: %w", clsPin, err)
	}
	if l, err := link.LoadPinnedLink(tcxPin, nil); err == nil {
		// Moving from tcx to cls_bpf: drop the tcx link.
		_ = l.Unpin()
		_ = l.Close()
	}
	return MethodClsBPF, nil
}

// attachTCX updates the pinned tcx link at pin, or creates and pins one.
func (d *Dataplane) attachTCX(ifindex int, p tcProg, prog *ebpf.Program, pin string) error {
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		defer l.Close()
		info, ierr := l.Info()
		if ierr == nil && info.TCX() != nil && int(info.TCX().Ifindex) == ifindex {
			if err := l.Update(prog); err != nil {
				return fmt.Errorf("update pinned link %s: %w", pin, err)
			}
			return nil
		}
		// The interface was deleted (and maybe recreated): the link is stale.
		if err := l.Unpin(); err != nil {
			return fmt.Errorf("unpin stale link %s: %w", pin, err)
		}
	}
	l, err := link.AttachTCX(link.TCXOptions{Interface: ifindex, Program: prog, Attach: p.tcxAttach()})
	if err != nil {
		return err
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		_ = l.Detach()
		return fmt.Errorf("pin link %s: %w", pin, err)
	}
	return nil
}

func (d *Dataplane) detachCls(ifname string, p tcProg, pin string) error {
	if d.cls == nil {
		return fmt.Errorf("detach %s from %s: attached with cls_bpf but no cls_bpf attacher configured", p.name, ifname)
	}
	if err := d.cls.DetachClsBPF(ifname, p.clsName(), p.egress); err != nil {
		if _, lerr := net.InterfaceByName(ifname); lerr == nil {
			return fmt.Errorf("detach %s from %s: %w", p.name, ifname, privHint(err))
		}
		// The interface is gone, and the filter with it.
	}
	if err := os.Remove(pin); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unpin %s: %w", pin, err)
	}
	return nil
}

// tcProgs lists every TC program lbctl may attach; Detach walks it.
var tcProgs = []tcProg{snatProg, steerProg}

// Attachments lists what lbctl attached, on every interface.
func (d *Dataplane) Attachments() ([]Attachment, error) {
	ents, err := os.ReadDir(filepath.Join(d.dir, "links"))
	if err != nil {
		return nil, fmt.Errorf("list attachments: %w", err)
	}
	var out []Attachment
	for _, e := range ents {
		for _, p := range tcProgs {
			if _, err := os.Stat(filepath.Join(d.linkDir(e.Name()), p.name)); err == nil {
				out = append(out, Attachment{Interface: e.Name(), Program: p.name, Method: MethodTCX})
			}
			if _, err := os.Stat(filepath.Join(d.linkDir(e.Name()), p.name+"_cls")); err == nil {
				out = append(out, Attachment{Interface: e.Name(), Program: p.name, Method: MethodClsBPF})
			}
		}
		out = append(out, d.xdpAttachments(e.Name())...)
	}
	return out, nil
}

// Detach removes every program lbctl attached to ifname and returns what it
// removed (nothing, if nothing was attached). When no interface is left
// the pinned maps are removed too: rules and counters go with the last
// attachment, and later calls on d fail.
func (d *Dataplane) Detach(ifname string) ([]Attachment, error) {
	return d.detachProgs(ifname, tcProgs, true)
}

// detachProgs removes the programs progs from ifname, then the interface's
// link directory if nothing is left in it, then the maps if no interface is.
func (d *Dataplane) detachProgs(ifname string, progs []tcProg, withXDP bool) ([]Attachment, error) {
	dir := d.linkDir(ifname)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		if _, err := lookupInterface(ifname); err != nil {
			return nil, fmt.Errorf("detach %s: %w", ifname, err)
		}
		return nil, nil
	}
	var done []Attachment
	for _, p := range progs {
		pin := filepath.Join(dir, p.name)
		if l, err := link.LoadPinnedLink(pin, nil); err == nil {
			derr := l.Detach()
			uerr := l.Unpin()
			l.Close()
			if derr != nil && !errors.Is(derr, os.ErrNotExist) && !errors.Is(derr, unix.ENOLINK) {
				// A link whose interface vanished is already detached.
				d.log.Debug("detach link", zap.String("pin", pin), zap.Error(derr))
			}
			if uerr != nil {
				return done, fmt.Errorf("unpin %s: %w", pin, uerr)
			}
			done = append(done, Attachment{Interface: ifname, Program: p.name, Method: MethodTCX})
		} else if !errors.Is(err, os.ErrNotExist) {
			return done, fmt.Errorf("load pinned link %s: %w", pin, privHint(err))
		}
		clsPin := filepath.Join(dir, p.name+"_cls")
		if _, err := os.Stat(clsPin); err == nil {
			if err := d.detachCls(ifname, p, clsPin); err != nil {
				return done, err
			}
			done = append(done, Attachment{Interface: ifname, Program: p.name, Method: MethodClsBPF})
		}
	}
	if withXDP {
		xdone, err := d.detachXDP(ifname)
		done = append(done, xdone...)
		if err != nil {
			return done, err
		}
	}
	if ents, err := os.ReadDir(dir); err == nil && len(ents) > 0 {
		return done, nil // another program stays attached to ifname
	}
	if err := os.Remove(dir); err != nil {
		return done, fmt.Errorf("remove %s: %w", dir, err)
	}
	return done, d.removeIfUnused()
}

// removeIfUnused unpins the maps and removes the state directory when no
// interface has a program attached any more.
func (d *Dataplane) removeIfUnused() error {
	ents, err := os.ReadDir(filepath.Join(d.dir, "links"))
	if err != nil {
		return fmt.Errorf("list attachments: %w", err)
	}
	if len(ents) > 0 {
		return nil
	}
	for _, m := range d.maps() {
		if err := m.Unpin(); err != nil {
			return fmt.Errorf("unpin map: %w", err)
		}
	}
	if err := d.unpinXDP(); err != nil {
		return err
	}
	if err := os.Remove(filepath.Join(d.dir, "links")); err != nil {
		return fmt.Errorf("remove state: %w", err)
	}
	if err := os.Remove(d.dir); err != nil {
		return fmt.Errorf("remove state: %w", err)
	}
	d.log.Debug("no interface left: removed pinned maps", zap.String("dir", d.dir))
	return nil
}

// maps lists every pinned map of every program.
func (d *Dataplane) maps() []*ebpf.Map {
	return []*ebpf.Map{d.snat.SnatRules, d.snat.SnatHosts, d.snat.SnatHosts4, d.snat.SnatHost4Slots, d.snat.SnatHost4Rules, d.snat.SnatRuleCounts, d.snat.SnatRuleStats, d.snat.SnatRuleBase, d.snat.SnatRewritten, d.snat.SnatCounters, d.snat.SnatFrags,
		d.steer.SteerUpstreams, d.steer.SteerCounters, d.steer.SteerFrags}
}
