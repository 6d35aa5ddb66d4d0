package health

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/lbctl/lbctl/pkg/config"
)

// maxReply bounds what a check reads: a UDP datagram or an HTTP body prefix.
const maxReply = 64 << 10

// Dialer opens the checks' sockets. The default is a plain net.Dialer: the
// kernel picks the load balancer's own source address, never a client's.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// probe runs one active check of addr; nil = passed. ctx carries the
// check's timeout.
type probe func(ctx context.Context, d Dialer, addr netip.AddrPort) error

// matcher tests a reply against an `expect` value: literal bytes
// (substring), or a regular expression written /like this/. A nil matcher
// accepts everything.
type matcher struct {
	lit []byte
	re  *regexp.Regexp
}

func newMatcher(expect string) (*matcher, error) {
	if expect == "" {
		return nil, nil
	}
	if len(expect) >= 2 && strings.HasPrefix(expect, "/") && strings.HasSuffix(expect, "/") {
		re, err := regexp.Compile(expect[1 : len(expect)-1])
		if err != nil {
			return nil, fmt.Errorf("expect %s: %w (fix the regexp)", expect, err)
		}
		return &matcher{re: re}, nil
	}
	return &matcher{lit: []byte(expect)}, nil
}

func (m *matcher) match(b []byte) bool {
	switch {
	case m == nil:
		return true
	case m.re != nil:
		return m.re.Match(b)
	}
	return bytes.Contains(b, m.lit)
}

func (m *matcher) String() string {
	if m.re != nil {
		return "/" + m.re.String() + "/"
	}
	return strconv.Quote(string(m.lit))
}

// newProbe builds the probe of a validated check config.
func newProbe(h *config.Health) (probe, error) {
	m, err := newMatcher(h.Expect)
	if err != nil {
		return nil, err
	}
	switch h.Type {
	case "tcp":
		return tcpProbe, nil
	case "udp":
		return udpProbe([]byte(h.Send), m), nil
	case "dns":
		return dnsProbe(h.Query, h.QType, m)
	case "http":
		lo, hi, err := parseStatus(h.Status)
		if err != nil {
			return nil, err
		}
		return httpProbe(h.Path, lo, hi, m), nil
	}
	return nil, fmt.Errorf("unknown check type %q (want tcp, udp, dns or http)", h.Type)
}

// Probe runs the active check h once against addr (the address as given:
// h.Port is the caller's business), opening its socket with d; nil means
// it passed. ctx bounds it (h.Timeout is not applied). lbctl doctor sends
// a service's dns check this way from a client's address, to probe the
// return path of a transparent UDP service.
func Probe(ctx context.Context, h *config.Health, d Dialer, addr netip.AddrPort) error {
	p, err := newProbe(h)
	if err != nil {
		return err
	}
	return p(ctx, d, addr)
}

// tcpProbe passes when a TCP connection is established.
func tcpProbe(ctx context.Context, d Dialer, addr netip.AddrPort) error {
	c, err := d.DialContext(ctx, "tcp", addr.String())
	if err != nil {
		return fmt.Errorf("connect: %w", unwrapOp(err))
	}
	return c.Close()
}

// exchange sends req on a connected UDP socket to addr and returns the
// first reply. A refused port (ICMP port unreachable) fails at once.
func exchange(ctx context.Context, d Dialer, addr netip.AddrPort, req []byte, accept func([]byte) bool) ([]byte, error) {
	c, err := d.DialContext(ctx, "udp", addr.String())
	if err != nil {
		return nil, fmt.Errorf("open udp socket: %w", unwrapOp(err))
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := c.Write(req); err != nil {
		return nil, fmt.Errorf("send: %w", unwrapOp(err))
	}
	buf := make([]byte, maxReply)
	for {
		n, err := c.Read(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return nil, errors.New("no reply within timeout")
			}
			return nil, fmt.Errorf("receive: %w", unwrapOp(err))
		}
		if accept == nil || accept(buf[:n]) {
			return buf[:n], nil
		}
	}
}

// udpProbe sends payload and passes on a reply that matches m (any reply
// when m is nil).
func udpProbe(payload []byte, m *matcher) probe {
	return func(ctx context.Context, d Dialer, addr netip.AddrPort) error {
		reply, err := exchange(ctx, d, addr, payload, nil)
		if err != nil {
			return err
		}
		if !m.match(reply) {
			return fmt.Errorf("reply %s does not match %s", quoteShort(reply), m)
		}
		return nil
	}
}

// httpProbe GETs path and passes on a status in [lo, hi] whose body (its
// first 64 KiB) matches m.
func httpProbe(path string, lo, hi int, m *matcher) probe {
	return func(ctx context.Context, d Dialer, addr netip.AddrPort) error {
		tr := &http.Transport{
			DialContext:        d.DialContext,
			DisableKeepAlives:  true,
			DisableCompression: true,
			Proxy:              nil,
		}
		defer tr.CloseIdleConnections()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr.String()+path, nil)
		if err != nil {
			return fmt.Errorf("build request: %w", err)
		}
		req.Header.Set("User-Agent", "lbctl-health")
		resp, err := tr.RoundTrip(req)
		if err != nil {
			return fmt.Errorf("GET %s: %w", path, unwrapOp(err))
		}
		defer resp.Body.Close()
		if resp.StatusCode < lo || resp.StatusCode > hi {
			return fmt.Errorf("GET %s: status %d, want %d-%d", path, resp.StatusCode, lo, hi)
		}
		if m == nil {
			return nil
		}
		body, err := io.ReadAll(io.LimitReader(resp.Body, maxReply))
		if err != nil {
			return fmt.Errorf("GET %s: read body: %w", path, unwrapOp(err))
		}
		if !m.match(body) {
			return fmt.Errorf("GET %s: body %s does not match %s", path, quoteShort(body), m)
		}
		return nil
	}
}

// parseStatus parses "200" or "200-399".
func parseStatus(s string) (lo, hi int, err error) {
	a, b, isRange := strings.Cut(s, "-")
	lo, err = strconv.Atoi(a)
	hi = lo
	if err == nil && isRange {
		hi, err = strconv.Atoi(b)
	}
	if err != nil || lo < 100 || hi > 599 || lo > hi {
		return 0, 0, fmt.Errorf("bad status range %q (want a code or a range such as 200-399)", s)
	}
	return lo, hi, nil
}

// unwrapOp drops the *net.OpError wrapping so messages read
// "connect: connection refused" rather than repeating both addresses.
func unwrapOp(err error) error {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno
	}
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil {
		if errors.Is(err, context.DeadlineExceeded) || op.Timeout() {
			return errors.New("timeout")
		}
		return op.Err
	}
	if errors.Is(err, context.DeadlineExceeded) {
		return errors.New("timeout")
	}
	return err
}

// quoteShort quotes the first 64 bytes of b for an error message.
func quoteShort(b []byte) string {
	if len(b) > 64 {
		return strconv.Quote(string(b[:64])) + "..."
	}
	return strconv.Quote(string(b))
}
