package config

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// problems parses src (as t.yaml) with every mode allowed and returns the
// problems formatted one per entry; nil when the config is valid.
func problems(t *testing.T, src string, modes map[Mode]bool) []string {
	t.Helper()
	cfg, err := parse("t.yaml", []byte(src), modes)
	if err == nil {
		if cfg == nil {
			t.Fatal("parse returned neither a config nor an error")
		}
		return nil
	}
	if cfg != nil {
		t.Errorf("parse returned a config along with error %v", err)
	}
	var ce *Error
	if !errors.As(err, &ce) {
		t.Fatalf("error %v is %T, want *config.Error", err, err)
	}
	var out []string
	for _, p := range ce.Problems {
		out = append(out, p.String())
	}
	if got := strings.Join(out, "\n"); got != err.Error() {
		t.Errorf("Error() = %q, want the problems one per line %q", err.Error(), got)
	}
	return out
}

// TestMalformed: each config has exactly the problems listed, with file,
// line, field path and message. Mode rules are checked with the
// implemented-modes gate bypassed (TestModeGate covers the gate).
func TestMalformed(t *testing.T) {
	for _, tc := range []struct {
		name string
		src  string
		want []string
	}{
		{"unknown key with suggestion", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstream: [198.19.16.11:80]
`, []string{
			`t.yaml:3: services[0].upstreams: at least one upstream is required`,
			`t.yaml:5: services[0].upstream: unknown key (did you mean "upstreams"?)`,
		}},
		{"unknown key without suggestion", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
    colour: blue
`, []string{`t.yaml:6: services[0].colour: unknown key`}},
		{"missing name", `
services:
  - listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
`, []string{`t.yaml:3: services[0].name: required`}},
		{"bad name", `
services:
  - name: my web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
`, []string{`t.yaml:3: services[0].name: "my web": use letters, digits, '-', '_' and '.' (at most 63, starting with a letter or digit)`}},
		{"duplicate name", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
  - name: web
    listen: 198.18.98.10:81
    upstreams: [198.19.16.11:80]
`, []string{`t.yaml:6: services[1].name: duplicate service name "web" (first at line 3)`}},
		{"bad protocol", `
services:
  - name: web
    protocol: sctp
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
`, []string{`t.yaml:4: services[0].protocol: unknown protocol "sctp" (want tcp or udp)`}},
		{"listen without port", `
services:
  - name: web
    listen: 198.18.98.10
    upstreams: [198.19.16.11:80]
`, []string{`t.yaml:4: services[0].listen: "198.18.98.10" has no port (want address:port, e.g. 198.18.98.10:80 or [2001:db8::10]:53)`}},
		{"listen name instead of address", `
services:
  - name: web
    listen: lb.example.com:80
    upstreams: [198.19.16.11:80]
`, []string{`t.yaml:4: services[0].listen: "lb.example.com" is not an IP address (want address:port, e.g. 198.18.98.10:80 or [2001:db8::10]:53; names are not resolved)`}},
		{"listen without address", `
services:
  - name: web
    listen: ":80"
    upstreams: [198.19.16.11:80]
`, []string{`t.yaml:4: services[0].listen: ":80" has no address (use 0.0.0.0:80 or [::]:80 for every address)`}},
		{"listen port 0 and missing listen", `
services:
  - name: web
    listen: 198.18.98.10:0
    upstreams: [198.19.16.11:80]
  - name: dns
    upstreams: [198.19.16.11:53]
`, []string{
			`t.yaml:4: services[0].listen: port 0 out of range`,
			`t.yaml:6: services[1].listen: required`,
		}},
		{"duplicate listen", `
services:
  - name: a
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
  - name: b
    protocol: udp
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
  - name: c
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
`, []string{`t.yaml:11: services[2].listen: 198.18.98.10:80/tcp is already the listen address of services[0] (line 4)`}},
		{"transparent and router-NAT upstream shared", `
services:
  - name: who
    protocol: udp
    listen: 198.18.98.10:9
    mode: transparent
    upstreams: [198.19.16.12:53, 198.19.16.11:53]
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    mode: dsr
    health: {type: dns, query: www.example.com}
    upstreams:
      - 198.19.16.11:53
      - 198.19.16.13:53
  - name: web
    listen: 198.18.98.10:80
    mode: xdp
    health: {type: tcp}
    upstreams: [198.19.16.12:53]
  - name: web2
    protocol: udp
    listen: 198.18.98.10:54
    mode: xdp
    dsr: {nat: origin}
    health: {type: dns, query: www.example.com}
    upstreams: [198.19.16.12:53]
  - name: tcp53
    listen: 198.18.98.10:53
    mode: transparent
    upstreams: [198.19.16.11:53]
`, []string{
			`t.yaml:14: services[1].upstreams[0]: upstream 198.19.16.11:53/udp is also an upstream of transparent service who (services[0].upstreams[1], line 7): the transparent service's steer program would deliver every reply from it to the proxy, so the replies meant for dns's router NAT would never reach the client; give the two services different upstream ports (or addresses), or use dsr.nat: origin`,
		}},
		{"router-NAT upstream before the transparent one", `
services:
  - name: web
    listen: 198.18.98.10:80
    mode: xdp
    health: {type: tcp}
    upstreams: [198.19.16.11:80]
  - name: tweb
    listen: 198.18.98.10:81
    mode: transparent
    upstreams: ["198.19.16.11:80"]
`, []string{
			`t.yaml:11: services[1].upstreams[0]: upstream 198.19.16.11:80/tcp is also an upstream of xdp service web (services[0].upstreams[0], line 7): the transparent service's steer program would deliver every reply from it to the proxy, so the replies meant for web's router NAT would never reach the client; give the two services different upstream ports (or addresses), or use dsr.nat: origin`,
		}},
		{"unknown xdp mode", `
xdp:
  mode: driver
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
`, []string{`t.yaml:3: xdp.mode: unknown xdp mode "driver" (want auto, native or generic)`}},
		{"wildcard listen overlaps", `
services:
  - name: a
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
  - name: b
    listen: "[::]:80"
    upstreams: [198.19.16.11:80]
  - name: c
    listen: 0.0.0.0:80
    upstreams: [198.19.16.11:80]
`, []string{`t.yaml:10: services[2].listen: 0.0.0.0:80/tcp overlaps 198.18.98.10:80/tcp of services[0] (line 4)`}},
		{"unknown mode and balance", `
services:
  - name: web
    listen: 198.18.98.10:80
    mode: fast
    balance: rr
    upstreams: [198.19.16.11:80]
`, []string{
			`t.yaml:5: services[0].mode: unknown mode "fast" (want proxy, transparent, dsr or xdp)`,
			`t.yaml:6: services[0].balance: unknown balance "rr" (want round_robin, least_conn, random_two or hash)`,
		}},
		{"no upstreams", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams: []
`, []string{`t.yaml:5: services[0].upstreams: at least one upstream is required`}},
		{"duplicate upstream", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams:
      - 198.19.16.11:80
      - 198.19.16.12:80
      - {address: 198.19.16.11:80, weight: 2}
`, []string{`t.yaml:8: services[0].upstreams[2]: duplicate upstream 198.19.16.11:80 (first at line 6)`}},
		{"upstream port out of range", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    upstreams:
      - 198.19.16.11:53
      - 198.19.16.12:53
      - 198.19.16.13:70000
      - {address: "198.19.16.14:0"}
`, []string{
			`t.yaml:12: services[1].upstreams[2]: port 70000 out of range`,
			`t.yaml:13: services[1].upstreams[3].address: port 0 out of range`,
		}},
		{"upstream IPv6 without brackets", `
services:
  - name: web
    listen: "[2001:db8:98::10]:53"
    upstreams: ["2001:db8:16::11:53"]
`, []string{`t.yaml:5: services[0].upstreams[0]: "2001:db8:16::11:53" has no port (want address:port, e.g. 198.18.98.10:80 or [2001:db8::10]:53)`}},
		{"upstream map without address, and weights", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams:
      - {weight: 2}
      - {address: 198.19.16.11:80, weight: 0}
      - {address: 198.19.16.12:80, weight: 1001}
      - {address: 198.19.16.13:80, weight: two}
      - {address: 198.19.16.14:80, backup: yes}
`, []string{
			`t.yaml:6: services[0].upstreams[0].address: required`,
			`t.yaml:7: services[0].upstreams[1].weight: weight 0 out of range (1-1000)`,
			`t.yaml:8: services[0].upstreams[2].weight: weight 1001 out of range (1-1000)`,
			`t.yaml:9: services[0].upstreams[3].weight: want an integer, got "two"`,
			`t.yaml:10: services[0].upstreams[4].backup: want true or false, got "yes"`,
		}},
		{"every upstream down", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams:
      - {address: 198.19.16.11:80, down: true}
      - {address: 198.19.16.12:80, backup: true, down: true}
`, []string{`t.yaml:5: services[0].upstreams: every upstream is marked down`}},
		{"only backups", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams:
      - {address: 198.19.16.11:80, down: true}
      - {address: 198.19.16.12:80, backup: true}
`, []string{`t.yaml:5: services[0].upstreams: every upstream that is not down is a backup; backups only stand in for failed primaries, so at least one must be neither`}},
		{"family mismatch in transparent mode", `
services:
  - name: web
    listen: 198.18.98.10:80
    mode: transparent
    upstreams: [198.19.16.11:80, "[2001:db8:16::12]:80"]
`, []string{`t.yaml:6: services[0].upstreams[1]: IPv6 upstream [2001:db8:16::12]:80 behind an IPv4 listen address: mode transparent sends from the client's address, so upstreams must be IPv4 too`}},
		{"responses on tcp, negative responses on udp", `
services:
  - name: web
    listen: 198.18.98.10:80
    responses: 1
    upstreams: [198.19.16.11:80]
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    responses: -1
    upstreams: [198.19.16.11:53]
`, []string{
			`t.yaml:5: services[0].responses: applies only to protocol udp`,
			`t.yaml:10: services[1].responses: must not be negative`,
		}},
		{"bad timeouts", `
drain_timeout: -5s
services:
  - name: web
    listen: 198.18.98.10:80
    connect_timeout: 0
    timeout: -1s
    next_upstream_tries: -1
    max_conns: -1
    upstreams: [198.19.16.11:80]
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    timeout: 5
    passive: {fail_timeout: 1h, slow_start: -1m, max_fails: -2}
    upstreams: [198.19.16.11:53]
`, []string{
			`t.yaml:2: drain_timeout: must not be negative`,
			`t.yaml:6: services[0].connect_timeout: must be positive`,
			`t.yaml:7: services[0].timeout: must not be negative`,
			`t.yaml:8: services[0].next_upstream_tries: must not be negative`,
			`t.yaml:9: services[0].max_conns: must not be negative`,
			`t.yaml:14: services[1].timeout: want a duration like 1s or 500ms, got "5"`,
			`t.yaml:15: services[1].passive.max_fails: must not be negative`,
			`t.yaml:15: services[1].passive.slow_start: must not be negative`,
		}},
		{"health type unknown and missing", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
    health: {type: icmp}
  - name: web2
    listen: 198.18.98.10:81
    upstreams: [198.19.16.11:80]
    health: {interval: 1s}
`, []string{
			`t.yaml:6: services[0].health.type: unknown check type "icmp" (want tcp, udp, dns or http)`,
			`t.yaml:10: services[1].health.type: required (tcp, udp, dns or http)`,
		}},
		{"dns check without query, bad qtype", `
services:
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    upstreams: [198.19.16.11:53]
    health:
      type: dns
      qtype: XYZ
`, []string{
			`t.yaml:7: services[0].health.query: required for type dns`,
			`t.yaml:9: services[0].health.qtype: unknown query type "XYZ" (want A, AAAA, CNAME, MX, NS, PTR, SOA, SRV or TXT)`,
		}},
		{"health rise, fall, port, timeout", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
    health:
      type: tcp
      rise: 0
      fall: -1
      port: 70000
      interval: 1s
      timeout: 1s
`, []string{
			`t.yaml:8: services[0].health.rise: must be at least 1`,
			`t.yaml:9: services[0].health.fall: must be at least 1`,
			`t.yaml:10: services[0].health.port: port 70000 out of range`,
			`t.yaml:12: services[0].health.timeout: 1s must be shorter than interval 1s`,
		}},
		{"http check status, path, regexp", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
    health:
      type: http
      path: healthz
      status: 200-600
      expect: /ok[/
`, []string{
			`t.yaml:8: services[0].health.path: "healthz" must start with /`,
			`t.yaml:9: services[0].health.status: bad status range "200-600" (want a code or a range such as 200-399, within 100-599)`,
			"t.yaml:10: services[0].health.expect: bad regexp /ok[/: error parsing regexp: missing closing ]: `[`",
		}},
		{"health keys of another type", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
    health: {type: tcp, query: www.example.com, status: "200"}
`, []string{
			`t.yaml:6: services[0].health.query: applies only to type dns`,
			`t.yaml:6: services[0].health.status: applies only to type http`,
		}},
		{"dsr over tcp without health check", `
services:
  - name: web
    protocol: tcp
    listen: 198.18.98.10:80
    mode: dsr
    upstreams: [198.19.16.11:80]
`, []string{
			`t.yaml:3: services[0].health: mode dsr requires an active health check: the load balancer never sees the upstreams' replies, so passive checks cannot tell a dead upstream from a live one`,
			`t.yaml:4: services[0].protocol: mode dsr requires protocol udp (TCP with direct server return is mode xdp)`,
		}},
		{"dsr with responses, timeout, passive, bad nat, wildcard listen", `
services:
  - name: dns
    protocol: udp
    listen: 0.0.0.0:53
    mode: dsr
    responses: 1
    timeout: 1s
    dsr: {nat: both}
    passive: {max_fails: 3}
    upstreams: [198.19.16.11:53]
    health: {type: dns, query: www.example.com}
`, []string{
			`t.yaml:5: services[0].listen: mode dsr needs a specific address (replies are rewritten to come from it), not 0.0.0.0`,
			`t.yaml:7: services[0].responses: mode dsr expects no reply through the load balancer; responses must be 0 or absent`,
			`t.yaml:8: services[0].timeout: mode dsr keeps no session to time out; timeout must be 0 or absent`,
			`t.yaml:9: services[0].dsr.nat: unknown nat "both" (want router or origin)`,
			`t.yaml:10: services[0].passive.max_fails: mode dsr sees no replies, so passive checks cannot work; use an active health check`,
		}},
		{"dsr family mismatch", `
services:
  - name: dns
    protocol: udp
    listen: "[2001:db8:98::10]:53"
    mode: dsr
    upstreams: ["[2001:db8:16::11]:53", 198.19.16.12:53]
    health: {type: dns, query: www.example.com}
`, []string{`t.yaml:7: services[0].upstreams[1]: IPv4 upstream 198.19.16.12:53 behind an IPv6 listen address: mode dsr sends from the client's address, so upstreams must be IPv6 too`}},
		{"dsr block outside dsr", `
services:
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    dsr: {nat: origin}
    upstreams: [198.19.16.11:53]
`, []string{`t.yaml:6: services[0].dsr: applies only to modes dsr and xdp`}},
		{"xdp with session keys and round robin", `
services:
  - name: web
    listen: 198.18.98.10:80
    mode: xdp
    balance: round_robin
    timeout: 1m
    upstreams: [198.19.16.11:80]
`, []string{
			`t.yaml:3: services[0].health: mode xdp requires an active health check: the load balancer never sees the upstreams' replies, so passive checks cannot tell a dead upstream from a live one`,
			`t.yaml:6: services[0].balance: mode xdp always balances with a Maglev consistent hash; balance must be hash or absent`,
			`t.yaml:7: services[0].timeout: does not apply to mode xdp: the kernel forwards each packet, no session or socket is kept`,
		}},
		{"xdp with an upstream interface and too many upstreams", `
services:
  - name: web
    listen: 198.18.98.10:80
    mode: xdp
    interface: eth1
    upstreams: [` + manyUpstreams(656) + `]
    health: {type: tcp}
`, []string{
			`t.yaml:6: services[0].interface: does not apply to mode xdp: the next hop comes from the routing table (bpf_fib_lookup)`,
			`t.yaml:7: services[0].upstreams: mode xdp takes at most 655 upstreams (100 Maglev slots each in a 65537-slot table), got 656`,
		}},
		{"transparent udp with responses 0", `
services:
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    mode: transparent
    responses: 0
    upstreams: [198.19.16.11:53]
`, []string{`t.yaml:7: services[0].responses: mode transparent relays replies through the load balancer; responses: 0 would drop them (direct replies are mode dsr)`}},
		{"top level blocks", `
log: {level: verbose, format: text}
metrics: {listen: localhost:9100}
transparent: {mark: 0, table: 254}
services:
  - name: web
    listen: 198.18.98.10:80
    interface: "eth0/1"
    on_all_down: drop
    upstreams: [198.19.16.11:80]
`, []string{
			`t.yaml:2: log.level: unknown level "verbose" (want debug, info, warn or error)`,
			`t.yaml:2: log.format: unknown format "text" (want console or json)`,
			`t.yaml:3: metrics.listen: "localhost" is not an IP address (want address:port, e.g. 198.18.98.10:80 or [2001:db8::10]:53; names are not resolved)`,
			`t.yaml:4: transparent.mark: must not be 0 (every unmarked packet has mark 0)`,
			`t.yaml:4: transparent.table: table 254 is reserved (253 default, 254 main, 255 local)`,
			`t.yaml:8: services[0].interface: "eth0/1" is not an interface name`,
			`t.yaml:9: services[0].on_all_down: unknown value "drop" (want try or reject)`,
		}},
		{"duplicate key", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
    name: www
`, []string{`t.yaml:6: services[0].name: duplicate key (first at line 3)`}},
		{"wrong shapes", `
services:
  - web
  - name: [a, b]
    listen: {address: 198.18.98.10:80}
    upstreams: 198.19.16.11:80
`, []string{
			`t.yaml:3: services[0]: want a service (a mapping with name, protocol, listen, upstreams...), got "web"`,
			`t.yaml:4: services[1].name: want a string, got a list`,
			`t.yaml:5: services[1].listen: want address:port, got a mapping`,
			`t.yaml:6: services[1].upstreams: want a list, got "198.19.16.11:80"`,
		}},
		{"no services", `
log: {level: info}
`, []string{`t.yaml:1: services: at least one service is required`}},
		{"empty file", ``, []string{`t.yaml:1: empty config: at least one service is required`}},
		{"top level is a list", `
- name: web
`, []string{`t.yaml:2: want a mapping of keys (log, metrics, services...), got a list`}},
		{"bad YAML: tab", "\nservices:\n\t- name: web\n", []string{`t.yaml:3: bad YAML: found character that cannot start any token`}},
		{"bad YAML: nested mapping on one line", `
log: level: info
`, []string{`t.yaml:2: bad YAML: mapping values are not allowed in this context`}},
		{"two documents", `
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80]
---
services: []
`, []string{`t.yaml:6: a second YAML document: lbctl reads one document per file`}},
		{"merge keys", `
x-up: &up {weight: 2}
services:
  - name: web
    listen: 198.18.98.10:80
    upstreams:
      - {<<: *up, address: 198.19.16.11:80}
`, []string{
			`t.yaml:2: x-up: unknown key (did you mean "xdp"?)`,
			`t.yaml:7: services[0].upstreams[0].<<: merge keys are not supported; repeat the keys`,
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := problems(t, tc.src, knownModes)
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("problems:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

// TestEveryProblemAtOnce: problems in several services and levels are all
// reported, ordered by line, not just the first.
func TestEveryProblemAtOnce(t *testing.T) {
	src := `
drain_timeout: soon
services:
  - name: web
    protocol: tcp
    listen: 198.18.98.10:80
    upstreams: [198.19.16.11:80, 198.19.16.11:80]
    health: {type: tcp, rise: 0}
  - name: web
    protocol: udp
    listen: 198.18.98.10:99999
    upstreams: []
    timeuot: 1s
`
	want := []string{
		`t.yaml:2: drain_timeout: want a duration like 1s or 500ms, got "soon"`,
		`t.yaml:7: services[0].upstreams[1]: duplicate upstream 198.19.16.11:80 (first at line 7)`,
		`t.yaml:8: services[0].health.rise: must be at least 1`,
		`t.yaml:9: services[1].name: duplicate service name "web" (first at line 4)`,
		`t.yaml:11: services[1].listen: port 99999 out of range`,
		`t.yaml:12: services[1].upstreams: at least one upstream is required`,
		`t.yaml:13: services[1].timeuot: unknown key (did you mean "timeout"?)`,
	}
	got := problems(t, src, implementedModes)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("problems:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// manyUpstreams lists n distinct upstreams 198.19.X.Y:80.
func manyUpstreams(n int) string {
	var s []string
	for i := range n {
		s = append(s, fmt.Sprintf("198.19.%d.%d:80", 16+i/200, 1+i%200))
	}
	return strings.Join(s, ", ")
}

// TestModeGate: every mode the schema knows either parses (implemented) or
// is refused with exactly the gate message. Flipping implementedModes needs
// no change here.
func TestModeGate(t *testing.T) {
	for m := range knownModes {
		src := `
services:
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    mode: ` + string(m) + `
    upstreams: [198.19.16.11:53, 198.19.16.12:53]
    health: {type: dns, query: www.example.com}
`
		// Valid under every mode rule: only the gate may refuse it.
		if got := problems(t, src, knownModes); got != nil {
			t.Fatalf("mode %s with the gate bypassed: %v", m, got)
		}
		got := problems(t, src, implementedModes)
		if implementedModes[m] {
			if got != nil {
				t.Errorf("implemented mode %s: %v", m, got)
			}
			continue
		}
		want := []string{`t.yaml:6: services[0].mode: mode "` + string(m) + `" is not implemented yet`}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("mode %s: %v, want %v", m, got, want)
		}
	}
	if !implementedModes[ModeProxy] {
		t.Error("mode proxy is not implemented")
	}
}

// designConfig is the config of /work/shared/DESIGN.md.
const designConfig = `log: {level: info, format: console}   # console | json
metrics: {listen: 127.0.0.1:9100}     # Prometheus /metrics; absent = off
services:
  - name: web
    protocol: tcp
    listen: 198.18.98.10:80
    mode: transparent          # proxy | transparent | dsr | xdp
    balance: round_robin       # round_robin | least_conn | random_two | hash
    upstreams:
      - 198.19.16.11:80
      - {address: 198.19.16.12:80, weight: 2}
    health: {type: tcp, interval: 1s, timeout: 500ms, rise: 2, fall: 2}
    passive: {max_fails: 1, fail_timeout: 10s}
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    mode: dsr
    responses: 0               # nginx proxy_responses
    timeout: 1s                # nginx proxy_timeout
    dsr: {nat: router}         # router | origin
    upstreams: [198.19.16.11:53, 198.19.16.12:53, 198.19.16.13:53, 198.19.16.14:53]
    health: {type: dns, query: www.example.com, interval: 1s}
`

// TestDesignConfig: DESIGN.md's example parses into the expected model with
// every default filled in — apart from its dsr `timeout: 1s`, which issue 5
// refuses (a dsr service keeps no session to time out).
func TestDesignConfig(t *testing.T) {
	got := problems(t, designConfig, knownModes)
	want := []string{`t.yaml:19: services[1].timeout: mode dsr keeps no session to time out; timeout must be 0 or absent`}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("DESIGN.md config: %v, want %v", got, want)
	}

	src := strings.Replace(designConfig, "    timeout: 1s                # nginx proxy_timeout\n", "", 1)
	cfg, err := parse("design.yaml", []byte(src), knownModes)
	if err != nil {
		t.Fatal(err)
	}
	up := func(s string, w int) Upstream {
		return Upstream{Addr: netip.MustParseAddrPort(s), Weight: w}
	}
	want2 := &Config{
		File:         "design.yaml",
		Log:          Log{Level: "info", Format: "console"},
		Metrics:      Metrics{Listen: "127.0.0.1:9100"},
		DrainTimeout: 30 * time.Second,
		Transparent:  Transparent{Mark: 0x1062, Table: 4194},
		XDP:          XDP{Mode: XDPAuto},
		Services: []Service{{
			Name:           "web",
			Protocol:       TCP,
			Listen:         netip.MustParseAddrPort("198.18.98.10:80"),
			Mode:           ModeTransparent,
			Balance:        RoundRobin,
			Upstreams:      []Upstream{up("198.19.16.11:80", 1), up("198.19.16.12:80", 2)},
			ConnectTimeout: 5 * time.Second,
			Timeout:        10 * time.Minute,
			Responses:      -1,
			Health: &Health{Type: "tcp", Interval: time.Second, Timeout: 500 * time.Millisecond,
				Rise: 2, Fall: 2},
			Passive:   Passive{MaxFails: 1, FailTimeout: 10 * time.Second},
			OnAllDown: "try",
		}, {
			Name:     "dns",
			Protocol: UDP,
			Listen:   netip.MustParseAddrPort("198.18.98.10:53"),
			Mode:     ModeDSR,
			Balance:  RoundRobin,
			Upstreams: []Upstream{up("198.19.16.11:53", 1), up("198.19.16.12:53", 1),
				up("198.19.16.13:53", 1), up("198.19.16.14:53", 1)},
			ConnectTimeout: 5 * time.Second,
			Timeout:        0,
			Responses:      0,
			Health: &Health{Type: "dns", Interval: time.Second, Timeout: 500 * time.Millisecond,
				Rise: 2, Fall: 2, Query: "www.example.com", QType: "A"},
			Passive:   Passive{MaxFails: 0, FailTimeout: 10 * time.Second},
			DSR:       DSR{NAT: "router"},
			OnAllDown: "try",
		}},
	}
	if !reflect.DeepEqual(cfg, want2) {
		t.Errorf("parsed\n%+v\nwant\n%+v", cfg, want2)
		for i := range min(len(cfg.Services), len(want2.Services)) {
			if !reflect.DeepEqual(cfg.Services[i].Health, want2.Services[i].Health) {
				t.Errorf("services[%d].health = %+v, want %+v", i, cfg.Services[i].Health, want2.Services[i].Health)
			}
		}
	}
}

// TestDefaults: a minimal service gets the documented defaults per protocol
// and mode, and explicit values are kept.
func TestDefaults(t *testing.T) {
	cfg, err := parse("t.yaml", []byte(`
drain_timeout: 0
transparent: {mark: 0x20, table: 300}
services:
  - name: web
    listen: "[2001:db8:98::10]:80"
    upstreams: ["[2001:db8:16::11]:80"]
  - name: dns
    protocol: udp
    listen: 198.18.98.10:53
    upstreams: [198.19.16.11:53]
    health: {type: http, interval: 800ms}
  - name: fast
    protocol: tcp
    listen: 198.18.98.10:443
    mode: xdp
    upstreams: [198.19.16.11:443]
    health: {type: udp, send: ping, expect: /^pong$/}
`), knownModes)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.DrainTimeout != 0 || cfg.Transparent != (Transparent{Mark: 0x20, Table: 300}) {
		t.Errorf("explicit top-level values lost: drain %v, transparent %+v", cfg.DrainTimeout, cfg.Transparent)
	}
	web, dns, fast := cfg.Services[0], cfg.Services[1], cfg.Services[2]
	if web.Protocol != TCP || web.Mode != ModeProxy || web.Balance != RoundRobin || web.Timeout != DefaultTCPTimeout ||
		web.Responses != -1 || web.Health != nil || web.Passive.MaxFails != 1 || web.DSR.NAT != "" {
		t.Errorf("tcp defaults: %+v", web)
	}
	if dns.Timeout != DefaultUDPTimeout || dns.Responses != -1 {
		t.Errorf("udp defaults: timeout %v responses %d", dns.Timeout, dns.Responses)
	}
	if h := dns.Health; h.Path != "/" || h.Status != "200-399" || h.Timeout != 400*time.Millisecond {
		t.Errorf("http check defaults (timeout half an interval below 1s): %+v", h)
	}
	if fast.Balance != Hash || fast.DSR.NAT != "router" || fast.Timeout != 0 || fast.Passive.MaxFails != 0 {
		t.Errorf("xdp defaults: %+v", fast)
	}
	if fast.Health.Send != "ping" || fast.Health.Expect != "/^pong$/" {
		t.Errorf("udp check: %+v", fast.Health)
	}
	if cfg.XDP.Mode != XDPAuto {
		t.Errorf("xdp.mode default: %q, want %q", cfg.XDP.Mode, XDPAuto)
	}
	for _, m := range []string{XDPAuto, XDPNative, XDPGeneric} {
		cfg, err := parse("t.yaml", []byte("xdp: {mode: "+m+"}\nservices: [{name: web, listen: 198.18.98.10:80, upstreams: [198.19.16.11:80]}]\n"), knownModes)
		if err != nil || cfg.XDP.Mode != m {
			t.Errorf("xdp.mode %s: %v, %+v", m, err, cfg)
		}
	}
}

// TestExamples: every file in examples/ is valid apart from the
// implemented-modes gate, and proxy.yaml is valid today.
func TestExamples(t *testing.T) {
	files, err := filepath.Glob("../../examples/*.yaml")
	if err != nil || len(files) < 2 {
		t.Fatalf("examples: %v %v", files, err)
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := parse(f, data, knownModes); err != nil {
			t.Errorf("%s:\n%v", f, err)
		}
	}
	if _, err := Load("../../examples/proxy.yaml"); err != nil {
		t.Errorf("examples/proxy.yaml must run today: %v", err)
	}
}

func TestLoadMissingFile(t *testing.T) {
	_, err := Load(filepath.Join(t.TempDir(), "nope.yaml"))
	if !errors.Is(err, os.ErrNotExist) || !strings.HasPrefix(err.Error(), "read config: ") {
		t.Errorf("Load of a missing file: %v", err)
	}
}

// TestAliasBomb: nested aliases are not expanded where the schema has no
// room for them, and many aliased services hit the node budget with one
// problem instead of a flood.
func TestAliasBomb(t *testing.T) {
	src := "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
	prev := "a"
	for _, n := range []string{"b", "c", "d", "e", "f", "g", "h", "i"} {
		src += n + ": &" + n + " [" + strings.Repeat("*"+prev+", ", 9) + "*" + prev + "]\n"
		prev = n
	}
	src += "services: *i\n"
	if got := problems(t, src, knownModes); len(got) != 19 {
		t.Errorf("billion laughs: %d problems, want 9 unknown keys + 10 bad services: %v", len(got), got)
	}

	var b strings.Builder
	b.WriteString("x: &s {name: web, listen: 198.18.98.10:80, upstreams: [198.19.16.11:80]}\nservices:\n")
	for range 20000 {
		b.WriteString("- *s\n")
	}
	want := []string{
		`t.yaml:1: x: unknown key`,
		`t.yaml:1: config too large: more than 100000 values once aliases are expanded`,
	}
	if got := problems(t, b.String(), knownModes); !reflect.DeepEqual(got, want) {
		t.Errorf("20000 aliased services: %d problems %.300v, want %v", len(got), got, want)
	}
}

func TestSuggest(t *testing.T) {
	fields := map[string]field{"upstreams": nil, "timeout": nil, "connect_timeout": nil, "name": nil}
	for key, want := range map[string]string{
		"upstream":   ` (did you mean "upstreams"?)`,
		"Timeout":    ` (did you mean "timeout"?)`,
		"connect":    ` (did you mean "connect_timeout"?)`,
		"nmae":       ` (did you mean "name"?)`,
		"completely": ``,
		"g":          ``,
		"nam":        ` (did you mean "name"?)`,
	} {
		if got := suggest(key, fields); got != want {
			t.Errorf("suggest(%q) = %q, want %q", key, got, want)
		}
	}
}

// FuzzParse: Parse never panics, and every problem carries a line within
// the file, a message, and the file name.
func FuzzParse(f *testing.F) {
	f.Add([]byte(designConfig))
	for _, name := range []string{"../../examples/proxy.yaml", "../../examples/lbctl.yaml"} {
		if data, err := os.ReadFile(name); err == nil {
			f.Add(data)
		}
	}
	f.Add([]byte("services:\n  - {name: a, listen: '[::1]:1', upstreams: [{address: 1.2.3.4:5, weight: 0}]}\n"))
	f.Add([]byte("a: &a [*a]\n"))
	f.Add([]byte("\t- :"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg, err := parse("f.yaml", data, knownModes)
		if err == nil {
			if cfg == nil || len(cfg.Services) == 0 {
				t.Fatalf("no error and no services: %+v", cfg)
			}
			return
		}
		var ce *Error
		if !errors.As(err, &ce) || len(ce.Problems) == 0 {
			t.Fatalf("error %v (%T) lists no problems", err, err)
		}
		// YAML breaks lines at \n, \r and the Unicode line breaks.
		lines := 2
		for _, br := range []string{"\n", "\r", "\u0085", "\u2028", "\u2029"} {
			lines += strings.Count(string(data), br)
		}
		for _, p := range ce.Problems {
			if p.Line < 1 || p.Line > lines || p.Msg == "" || p.File != "f.yaml" {
				t.Fatalf("problem %+v: want file f.yaml, line 1..%d and a message", p, lines)
			}
		}
	})
}

// TestDSRExample: examples/dsr.yaml runs today, and a dsr service gets the
// defaults of a sessionless mode: router NAT, no reply expected, no
// session timeout, no passive checks.
func TestDSRExample(t *testing.T) {
	cfg, err := Load("../../examples/dsr.yaml")
	if err != nil {
		t.Fatalf("examples/dsr.yaml must run: %v", err)
	}
	if len(cfg.Services) != 2 {
		t.Fatalf("%d services, want 2", len(cfg.Services))
	}
	for _, s := range cfg.Services {
		if s.Mode != ModeDSR || s.Protocol != UDP || s.DSR.NAT != "router" || s.Responses != 0 ||
			s.Timeout != 0 || s.Passive.MaxFails != 0 || s.Balance != RoundRobin || s.Health == nil {
			t.Errorf("service %s: %+v", s.Name, s)
		}
	}
}
