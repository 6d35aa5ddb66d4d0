package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/lbctl/lbctl/pkg/config"
	"github.com/lbctl/lbctl/pkg/daemon"
	"github.com/lbctl/lbctl/pkg/dataplane"
)

var snatCmd = command{
	name:    "snat",
	summary: "add, delete and list source-rewrite rules (DSR router/origin NAT)",
	run:     runSNAT,
}

const snatUsage = `usage:
  lbctl snat add --src PREFIX --proto udp|tcp [--sport PORT] --to ADDR[:PORT]
  lbctl snat add --vip-from lbctl.yaml --service NAME [--src ADDR]
  lbctl snat del --src PREFIX --proto udp|tcp [--sport PORT]
  lbctl snat del --vip-from lbctl.yaml --service NAME [--src ADDR]
  lbctl snat list [--json]
e.g. lbctl snat add --src 198.19.16.0/28 --proto udp --sport 53 --to 198.18.98.10:53
     lbctl snat add --src 2001:db8:16::10/124 --proto udp --sport 53 --to [2001:db8:98::10]:53
     lbctl snat add --vip-from lbctl.yaml --service dns --src 198.19.16.11   (origin NAT on backend 1)`

func runSNAT(ctx context.Context, e *env, args []string) error {
	if len(args) == 0 {
		return usagef("missing subcommand add, del or list\n%s", snatUsage)
	}
	switch args[0] {
	case "add":
		return runSNATAdd(e, args[1:])
	case "del", "delete":
		return runSNATDel(e, args[1:])
	case "list", "ls":
		return runSNATList(e, args[1:])
	case "-h", "--help", "help":
		fmt.Fprintln(e.stdout, snatUsage)
		return nil
	}
	return usagef("unknown subcommand %q: want add, del or list\n%s", args[0], snatUsage)
}

// snatMatchFlags are the flags naming a rule's match, or the config
// service it is derived from.
type snatMatchFlags struct{ src, proto, sport, vipFrom, service *string }

// fromConfig returns the rules --vip-from and --service derive (with
// --src, this backend's only); ok is false without --vip-from.
func (m snatMatchFlags) fromConfig(to string) (rules []dataplane.SNATRule, ok bool, err error) {
	if *m.vipFrom == "" {
		if *m.service != "" {
			return nil, false, usagef("--service needs --vip-from FILE\n%s", snatUsage)
		}
		return nil, false, nil
	}
	if *m.service == "" {
		return nil, true, usagef("--vip-from needs --service NAME\n%s", snatUsage)
	}
	if *m.proto != "" || *m.sport != "" || to != "" {
		return nil, true, usagef("--vip-from derives --proto, --sport and --to from the service: leave them out")
	}
	var only netip.Prefix
	if *m.src != "" {
		if a, err := netip.ParseAddr(*m.src); err == nil {
			only = netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen())
		} else if only, err = netip.ParsePrefix(*m.src); err != nil {
			return nil, true, usagef("--src %q: not an address (want this backend's address, e.g. 198.19.16.11)", *m.src)
		}
	}
	cfg, err := config.Load(*m.vipFrom)
	if err != nil {
		return nil, true, err
	}
	rules, err = daemon.OriginNATRules(cfg, *m.service, only)
	if err != nil {
		return nil, true, usageError{msg: err.Error()}
	}
	return rules, true, nil
}

func (m snatMatchFlags) parse(r *dataplane.SNATRule) error {
	if *m.src == "" {
		return usagef("--src PREFIX is required\n%s", snatUsage)
	}
	p, err := netip.ParsePrefix(*m.src)
	if err != nil {
		return usagef("--src %q: not a prefix (want ADDR/LEN, e.g. 198.19.16.0/28 or 2001:db8:16::10/124)", *m.src)
	}
	r.Src = p
	if *m.proto == "" {
		return usagef("--proto udp|tcp is required\n%s", snatUsage)
	}
	if r.Proto, err = dataplane.ParseProto(*m.proto); err != nil {
		return usagef("--proto %q: want udp or tcp", *m.proto)
	}
	if *m.sport != "" {
		if r.SPort, err = parsePort(*m.sport); err != nil {
			return usagef("--sport %q: %v", *m.sport, err)
		}
	}
	return nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, errors.New("not a port (want 1-65535)")
	}
	return uint16(n), nil
}

// parseTarget parses ADDR, ADDR:PORT, IPV6 or [IPV6]:PORT.
func parseTarget(s string) (netip.Addr, uint16, error) {
	bad := fmt.Errorf("--to %q: not an address (want ADDR[:PORT], e.g. 198.18.98.10:53 or [2001:db8:98::10]:53)", s)
	if strings.HasPrefix(s, "[") {
		if strings.HasSuffix(s, "]") {
			a, err := netip.ParseAddr(s[1 : len(s)-1])
			if err != nil {
				return netip.Addr{}, 0, bad
			}
			return a, 0, nil
		}
		i := strings.LastIndex(s, "]:")
		if i < 0 {
			return netip.Addr{}, 0, bad
		}
		a, err := netip.ParseAddr(s[1:i])
		if err != nil {
			return netip.Addr{}, 0, bad
		}
		port, err := parsePort(s[i+2:])
		if err != nil {
			return netip.Addr{}, 0, fmt.Errorf("--to %q: port %q: %v", s, s[i+2:], err)
		}
		return a, port, nil
	}
	if strings.Count(s, ":") == 1 {
		i := strings.IndexByte(s, ':')
		a, err := netip.ParseAddr(s[:i])
		if err != nil {
			return netip.Addr{}, 0, bad
		}
		port, err := parsePort(s[i+1:])
		if err != nil {
			return netip.Addr{}, 0, fmt.Errorf("--to %q: port %q: %v", s, s[i+1:], err)
		}
		return a, port, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, 0, bad
	}
	return a, 0, nil
}

// flagSetWithMatch is a subcommand's flags with the match flags bound.
type flagSetWithMatch struct {
	*flag.FlagSet
	m snatMatchFlags
}

func newSNATFlags(e *env, sub string) *flagSetWithMatch {
	fs := newFlags("snat "+sub, e.stderr)
	m := snatMatchFlags{
		src:     fs.String("src", "", "source `PREFIX` to match, e.g. 198.19.16.0/28 (with --vip-from: this backend's ADDR)"),
		proto:   fs.String("proto", "", "protocol to match: udp or tcp"),
		sport:   fs.String("sport", "", "source `PORT` to match (default: any)"),
		vipFrom: fs.String("vip-from", "", "derive the rules from the config `FILE` lbctl run reads (origin NAT)"),
		service: fs.String("service", "", "with --vip-from: the `NAME` of the service"),
	}
	fs.Usage = func() {
		fmt.Fprintln(e.stderr, snatUsage)
		fs.PrintDefaults()
	}
	return &flagSetWithMatch{FlagSet: fs, m: m}
}

func runSNATAdd(e *env, args []string) error {
	f := newSNATFlags(e, "add")
	to := f.String("to", "", "new source `ADDR[:PORT]` (port omitted: keep the port)")
	pos, err := parseFlags(f.FlagSet, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q\n%s", pos[0], snatUsage)
	}
	if rules, ok, err := f.m.fromConfig(*to); ok || err != nil {
		if err != nil {
			return err
		}
		return snatAddDerived(e, rules)
	}
	var r dataplane.SNATRule
	if err := f.m.parse(&r); err != nil {
		return err
	}
	if *to == "" {
		return usagef("--to ADDR[:PORT] is required\n%s", snatUsage)
	}
	if r.To, r.ToPort, err = parseTarget(*to); err != nil {
		return usageError{msg: err.Error()}
	}
	if err := r.Validate(); err != nil {
		return usageError{msg: err.Error()}
	}
	dp, err := openDataplane(e, false, false)
	if err != nil {
		return err
	}
	defer dp.Close()
	if err := dp.AddSNAT(r); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "added snat rule %s\n", r)
	return nil
}

func runSNATDel(e *env, args []string) error {
	f := newSNATFlags(e, "del")
	pos, err := parseFlags(f.FlagSet, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q\n%s", pos[0], snatUsage)
	}
	if rules, ok, err := f.m.fromConfig(""); ok || err != nil {
		if err != nil {
			return err
		}
		return snatDelDerived(e, rules)
	}
	var r dataplane.SNATRule
	if err := f.m.parse(&r); err != nil {
		return err
	}
	dp, err := openDataplane(e, false, true)
	if err != nil {
		if errorsIsNoState(err) {
			return fmt.Errorf("delete snat rule %s: %w (no lbctl state under %s)", r, dataplane.ErrRuleNotFound, e.bpffs)
		}
		return err
	}
	defer dp.Close()
	if err := dp.DelSNAT(r); err != nil {
		return err
	}
	fmt.Fprintf(e.stdout, "deleted snat rule %s\n", r)
	return nil
}

// snatAddDerived adds the rules derived from a config; those present with
// the same target already are left as they are (running it twice is fine).
func snatAddDerived(e *env, rules []dataplane.SNATRule) error {
	dp, err := openDataplane(e, false, false)
	if err != nil {
		return err
	}
	defer dp.Close()
	for _, r := range rules {
		added, err := daemon.EnsureSNAT(dp, r)
		if err != nil {
			return err
		}
		if added {
			fmt.Fprintf(e.stdout, "added snat rule %s\n", r)
		} else {
			fmt.Fprintf(e.stdout, "snat rule %s already present\n", r)
		}
	}
	return nil
}

// snatDelDerived deletes the rules derived from a config.
func snatDelDerived(e *env, rules []dataplane.SNATRule) error {
	dp, err := openDataplane(e, false, true)
	if err != nil {
		if errorsIsNoState(err) {
			return fmt.Errorf("delete snat rule %s: %w (no lbctl state under %s)", rules[0], dataplane.ErrRuleNotFound, e.bpffs)
		}
		return err
	}
	defer dp.Close()
	for _, r := range rules {
		if err := dp.DelSNAT(r); err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "deleted snat rule %s\n", r)
	}
	return nil
}

func runSNATList(e *env, args []string) error {
	fs := newFlags("snat list", e.stderr)
	asJSON := fs.Bool("json", false, "print JSON")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return usagef("unexpected argument %q\n%s", pos[0], snatUsage)
	}
	var rules []dataplane.SNATRule
	dp, err := openDataplane(e, false, true)
	switch {
	case errorsIsNoState(err):
	case err != nil:
		return err
	default:
		defer dp.Close()
		if rules, err = dp.ListSNAT(); err != nil {
			return err
		}
	}
	if *asJSON {
		if rules == nil {
			rules = []dataplane.SNATRule{}
		}
		enc := json.NewEncoder(e.stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(rules)
	}
	tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SRC\tPROTO\tSPORT\tTO\tTO PORT")
	for _, r := range rules {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.Src, r.Proto, portOrAny(r.SPort, "any"), r.To, portOrAny(r.ToPort, "keep"))
	}
	return tw.Flush()
}

func portOrAny(p uint16, zero string) string {
	if p == 0 {
		return zero
	}
	return strconv.Itoa(int(p))
}

func errorsIsNoState(err error) bool { return errors.Is(err, dataplane.ErrNoState) }
