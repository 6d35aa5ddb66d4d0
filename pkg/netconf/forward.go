package netconf

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strings"
)

// SetSysctl writes a sysctl of the calling thread's network namespace,
// named with dots (net.ipv4.ip_forward).
func SetSysctl(name, value string) error {
	if err := os.WriteFile("/proc/sys/"+strings.ReplaceAll(name, ".", "/"), []byte(value), 0o644); err != nil {
		return fmt.Errorf("set sysctl %s=%s: %w", name, value, err)
	}
	return nil
}

// ForwardingSysctl is the sysctl that turns routing on for the family of a.
func ForwardingSysctl(a netip.Addr) string {
	if a.Unmap().Is4() {
		return "net.ipv4.ip_forward"
	}
	return "net.ipv6.conf.all.forwarding"
}

// EnableForwarding sets each named sysctl (ForwardingSysctl) to 1 and
// returns a function that writes back the values found, for those it
// changed only. On error nothing stays changed.
func EnableForwarding(names ...string) (restore func() error, err error) {
	type saved struct{ name, value string }
	var changed []saved
	restore = func() error {
		var errs []error
		for i := len(changed) - 1; i >= 0; i-- {
			if err := SetSysctl(changed[i].name, changed[i].value); err != nil {
				errs = append(errs, err)
			}
		}
		changed = nil
		return errors.Join(errs...)
	}
	seen := map[string]bool{}
	for _, n := range names {
		if seen[n] {
			continue
		}
		seen[n] = true
		v, err := Sysctl(n)
		if err != nil {
			return nil, errors.Join(fmt.Errorf("enable forwarding: %w", err), restore())
		}
		if v == "1" {
			continue
		}
		if err := SetSysctl(n, "1"); err != nil {
			return nil, errors.Join(fmt.Errorf("enable forwarding: %w (needs CAP_NET_ADMIN)", err), restore())
		}
		changed = append(changed, saved{n, v})
	}
	return restore, nil
}

// ClientInterfaces returns the interfaces replies to clients of a service
// listening on vip leave by: the one holding vip and the one of the main
// table's default route of vip's family (once if they are the same; lo,
// where a DSR VIP often lives, is no way out).
func ClientInterfaces(vip netip.Addr) ([]string, error) {
	var out []string
	if ifname, _, ok := localAddr(vip); ok && ifname != "" && ifname != "lo" {
		out = append(out, ifname)
	}
	if ifname, _, err := defaultRoute(familyOf(vip)); err == nil && ifname != "" && (len(out) == 0 || out[0] != ifname) {
		out = append(out, ifname)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("find the client-facing interface of %s: no interface holds it and there is no default route (add the address, e.g. ip addr add %s dev eth0)", vip, vip)
	}
	return out, nil
}
