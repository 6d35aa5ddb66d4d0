// Command minrelay is a measuring stick for the TCP front end, not part of
// lbctl: the smallest relay Go's net package allows (net.Listen, net.Dial,
// io.Copy both ways with CloseWrite, round robin over the upstreams), with
// none of lbctl's features (no timeouts, limits, health or accounting). UDP
// services get one new upstream socket and one reply per datagram, which is
// enough for the benchmark's readiness probe.
//
// The benchmark runs it in place of `lbctl run -c FILE` through a wrapper
// given as -lbctl, which hands `run` to minrelay and everything else
// (`config check`) to the real lbctl:
//
//	#!/bin/sh
//	for a in "$@"; do [ "$a" = run ] && exec bin/minrelay "$@"; done
//	exec bin/lbctl "$@"
//
// docs/proxy.md ("The floor of Go itself") has what it measured.
package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/lbctl/lbctl/pkg/config"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "minrelay:", err)
		os.Exit(1)
	}
}

// run takes lbctl's command line (`[--bpffs DIR] run -c FILE`) and serves
// the file's services until SIGTERM or SIGINT.
func run(args []string) error {
	var file string
	for i, a := range args {
		if a == "-c" && i+1 < len(args) {
			file = args[i+1]
		}
	}
	if file == "" {
		return fmt.Errorf("usage: minrelay run -c FILE")
	}
	cfg, err := config.Load(file)
	if err != nil {
		return err
	}
	for _, s := range cfg.Services {
		var ups []string
		for _, u := range s.Upstreams {
			ups = append(ups, u.Addr.String())
		}
		if len(ups) == 0 {
			return fmt.Errorf("service %s: no upstreams", s.Name)
		}
		if s.Protocol == config.UDP {
			pc, err := net.ListenPacket("udp", s.Listen.String())
			if err != nil {
				return fmt.Errorf("service %s: %w", s.Name, err)
			}
			go serveUDP(pc, ups)
			continue
		}
		ln, err := net.Listen("tcp", s.Listen.String())
		if err != nil {
			return fmt.Errorf("service %s: %w", s.Name, err)
		}
		go serveTCP(ln, ups)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
	return nil
}

func serveTCP(ln net.Listener, ups []string) {
	var n atomic.Uint64
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			b, err := net.Dial("tcp", ups[n.Add(1)%uint64(len(ups))])
			if err != nil {
				return
			}
			defer b.Close()
			done := make(chan struct{})
			go func() {
				io.Copy(b, c)
				b.(*net.TCPConn).CloseWrite()
				close(done)
			}()
			io.Copy(c, b)
			c.(*net.TCPConn).CloseWrite()
			<-done
		}()
	}
}

// serveUDP answers each datagram through a new upstream socket, one reply
// (like nginx's `proxy_responses 1`), waiting at most a second for it.
func serveUDP(pc net.PacketConn, ups []string) {
	var n atomic.Uint64
	for {
		buf := make([]byte, 65536)
		m, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		go func() {
			u, err := net.Dial("udp", ups[n.Add(1)%uint64(len(ups))])
			if err != nil {
				return
			}
			defer u.Close()
			if _, err := u.Write(buf[:m]); err != nil {
				return
			}
			u.SetReadDeadline(time.Now().Add(time.Second))
			r, err := u.Read(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:r], from)
		}()
	}
}
