// Command backend is the demo upstream of lbctl's demo and benchmark: one
// process per backend host of the namespace topology, serving
//
//   - HTTP: every request is answered with
//     "Hello from NAME. You connected from ADDR:PORT to ADDR:PORT\n"
//     (the connection's remote and local address, IPv6 in brackets), the
//     seed blog's demo page that shows which address the backend sees;
//   - DNS over UDP: www.example.com A and AAAA answered with the backend's
//     own addresses (--a, --aaaa), NXDOMAIN for every other name;
//   - UDP echo (optional): every datagram is sent back unchanged.
//
// Every listen flag may be repeated (IPv4 and IPv6). UDP listeners are
// opened once per CPU with SO_REUSEPORT so that many concurrent queries are
// served by several goroutines. SIGINT or SIGTERM stops it, exit status 0.
//
//	backend --name dev1 --http 198.19.16.11:80 --http [2001:db8:16::11]:80 \
//	        --dns 198.19.16.11:53 --dns [2001:db8:16::11]:53
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stderr)
	stop()
	os.Exit(code)
}

// addrList is a repeatable ADDR:PORT flag.
type addrList []netip.AddrPort

func (l *addrList) String() string {
	s := make([]string, len(*l))
	for i, a := range *l {
		s[i] = a.String()
	}
	return strings.Join(s, ",")
}

func (l *addrList) Set(v string) error {
	ap, err := netip.ParseAddrPort(v)
	if err != nil {
		return fmt.Errorf("want ADDR:PORT ([ADDR]:PORT for IPv6), got %q", v)
	}
	*l = append(*l, ap)
	return nil
}

// addrFlag is an optional single address flag.
type addrFlag struct{ a netip.Addr }

func (f *addrFlag) String() string {
	if !f.a.IsValid() {
		return ""
	}
	return f.a.String()
}

func (f *addrFlag) Set(v string) error {
	a, err := netip.ParseAddr(v)
	if err != nil {
		return fmt.Errorf("want an IP address, got %q", v)
	}
	f.a = a
	return nil
}

// config is the parsed command line.
type config struct {
	name      string
	http, dns addrList
	udpEcho   addrList
	a, aaaa   addrFlag
	readers   int
	logLevel  string
}

func parseArgs(args []string, stderr io.Writer) (*config, error) {
	var c config
	fs := flag.NewFlagSet("backend", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&c.name, "name", "", "name printed in every HTTP answer (required), e.g. dev1")
	fs.Var(&c.http, "http", "serve HTTP on ADDR:PORT (repeatable)")
	fs.Var(&c.dns, "dns", "serve DNS over UDP on ADDR:PORT (repeatable)")
	fs.Var(&c.udpEcho, "udp-echo", "echo UDP datagrams on ADDR:PORT (repeatable)")
	fs.Var(&c.a, "a", "IPv4 address answered for www.example.com A (default: the first specific IPv4 --dns address)")
	fs.Var(&c.aaaa, "aaaa", "IPv6 address answered for www.example.com AAAA (default: the first specific IPv6 --dns address)")
	fs.IntVar(&c.readers, "readers", runtime.GOMAXPROCS(0), "SO_REUSEPORT sockets (one reading goroutine each) per UDP address")
	fs.StringVar(&c.logLevel, "log-level", "info", "log level: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	switch {
	case fs.NArg() > 0:
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	case c.name == "":
		return nil, errors.New("--name is required")
	case len(c.http)+len(c.dns)+len(c.udpEcho) == 0:
		return nil, errors.New("nothing to serve: give at least one of --http, --dns, --udp-echo")
	case c.readers < 1:
		return nil, fmt.Errorf("--readers must be at least 1, got %d", c.readers)
	case c.a.a.IsValid() && !c.a.a.Is4():
		return nil, fmt.Errorf("--a wants an IPv4 address, got %s", c.a.a)
	case c.aaaa.a.IsValid() && !c.aaaa.a.Is6():
		return nil, fmt.Errorf("--aaaa wants an IPv6 address, got %s", c.aaaa.a)
	}
	for _, ap := range c.dns {
		a := ap.Addr().Unmap()
		if a.IsUnspecified() {
			continue
		}
		if a.Is4() && !c.a.a.IsValid() {
			c.a.a = a
		}
		if a.Is6() && !c.aaaa.a.IsValid() {
			c.aaaa.a = a
		}
	}
	return &c, nil
}

func run(ctx context.Context, args []string, stderr io.Writer) int {
	c, err := parseArgs(args, stderr)
	if err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(stderr, "backend: %v\n", err)
			return 2
		}
		return 0
	}
	var level zapcore.Level
	if err := level.Set(c.logLevel); err != nil {
		fmt.Fprintf(stderr, "backend: --log-level: %v\n", err)
		return 2
	}
	enc := zap.NewDevelopmentEncoderConfig()
	log := zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.Lock(zapcore.AddSync(stderr)), level)).
		With(zap.String("backend", c.name))
	defer log.Sync() //nolint:errcheck // stderr

	if err := serve(ctx, log, c); err != nil {
		log.Error("backend failed", zap.Error(err))
		return 1
	}
	return 0
}

// serve opens every listener, serves until ctx ends, then closes them all.
// A listener that cannot be opened fails the whole start.
func serve(ctx context.Context, log *zap.Logger, c *config) error {
	s := newServers(log)
	defer s.close()
	dns := &dnsAnswerer{a: c.a.a, aaaa: c.aaaa.a}
	for _, ap := range c.http {
		if err := s.startHTTP(ap, c.name); err != nil {
			return err
		}
	}
	for _, ap := range c.dns {
		if err := s.startUDP(ctx, ap, c.readers, "dns", dns.answer); err != nil {
			return err
		}
	}
	for _, ap := range c.udpEcho {
		if err := s.startUDP(ctx, ap, c.readers, "udp-echo", echo); err != nil {
			return err
		}
	}
	log.Info("serving", zap.Stringer("http", &c.http), zap.Stringer("dns", &c.dns),
		zap.Stringer("udp_echo", &c.udpEcho), zap.Stringer("a", &c.a), zap.Stringer("aaaa", &c.aaaa))
	select {
	case <-ctx.Done():
		log.Info("stopping")
		return nil
	case err := <-s.failed:
		return err
	}
}
