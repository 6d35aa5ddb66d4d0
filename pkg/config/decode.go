package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/netip"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"
)

// nodeBudget bounds the nodes visited, aliases expanded: a few lines of
// nested aliases (the "billion laughs") must not take the checker down.
const nodeBudget = 100_000

// decoder walks the yaml.Node tree into a Config, recording the line of
// every field path it sees and every problem it meets.
type decoder struct {
	file      string
	problems  []Problem
	lines     map[string]int  // field path -> line of its key (or list item)
	bad       map[string]bool // field paths with a problem already reported
	budget    int
	exhausted bool
	svcs      []svcMeta // parallel to Config.Services
}

// svcMeta keeps the field paths of a decoded service: list items that were
// not mappings are left out of Config.Services, so indices may differ.
type svcMeta struct {
	path string
	ups  []string // parallel to Service.Upstreams
}

// field decodes the value of one key; path is the key's field path.
type field func(path string, v *yaml.Node)

func newDecoder(file string) *decoder {
	return &decoder{file: file, lines: map[string]int{}, bad: map[string]bool{}, budget: nodeBudget}
}

func (d *decoder) add(line int, path, format string, args ...any) {
	if line < 1 {
		line = 1
	}
	d.problems = append(d.problems, Problem{File: d.file, Line: line, Field: path, Msg: fmt.Sprintf(format, args...)})
	d.bad[path] = true
}

// at reports a problem on path at the line where path, or the closest
// enclosing field, was written.
func (d *decoder) at(path, format string, args ...any) {
	d.add(d.lineOf(path), path, format, args...)
}

func (d *decoder) lineOf(path string) int {
	for p := path; p != ""; p = parentPath(p) {
		if l, ok := d.lines[p]; ok {
			return l
		}
	}
	return 1
}

// seen reports whether path was written in the file with a non-null
// value, well-formed or not: "required" checks use it.
func (d *decoder) seen(path string) bool {
	_, ok := d.lines[path]
	return ok
}

// has reports whether path was written and decoded without a problem:
// checks of its value and defaults use it, so a malformed value is
// reported once, not again as a consequence.
func (d *decoder) has(path string) bool {
	return d.seen(path) && !d.bad[path]
}

func parentPath(p string) string {
	i := strings.LastIndexAny(p, ".[")
	if i < 0 {
		return ""
	}
	return p[:i]
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

func (d *decoder) err() error {
	sort.SliceStable(d.problems, func(i, j int) bool { return d.problems[i].Line < d.problems[j].Line })
	return &Error{Problems: d.problems}
}

var yamlLine = regexp.MustCompile(`^yaml: line (\d+): `)

// syntaxProblem turns a yaml.v3 parse error into a problem with a line.
func (d *decoder) syntaxProblem(err error) {
	msg := err.Error()
	line := 1
	if m := yamlLine.FindStringSubmatch(msg); m != nil {
		line, _ = strconv.Atoi(m[1])
		msg = msg[len(m[0]):]
	}
	msg = strings.TrimPrefix(msg, "yaml: ")
	d.add(line, "", "bad YAML: %s", msg)
}

// parseYAML decodes the documents of data; a panic in the YAML library is
// reported as a problem, never passed on.
func (d *decoder) parseYAML(data []byte) (root *yaml.Node) {
	defer func() {
		if r := recover(); r != nil {
			root = nil
			d.add(1, "", "bad YAML: %v", r)
		}
	}()
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			d.add(1, "", "empty config: at least one service is required")
		} else {
			d.syntaxProblem(err)
		}
		return nil
	}
	var extra yaml.Node
	switch err := dec.Decode(&extra); {
	case err == nil:
		d.add(extra.Line, "", "a second YAML document: lbctl reads one document per file")
	case !errors.Is(err, io.EOF):
		d.syntaxProblem(err)
	}
	if doc.Kind != yaml.DocumentNode || len(doc.Content) == 0 {
		d.add(1, "", "empty config: at least one service is required")
		return nil
	}
	return doc.Content[0]
}

// decode parses data into a Config, or returns nil when the YAML itself is
// unreadable.
func (d *decoder) decode(data []byte) *Config {
	root := d.parseYAML(data)
	if root == nil {
		return nil
	}
	if root = d.resolve(root); root == nil {
		return nil
	}
	if isNull(root) {
		d.add(root.Line, "", "empty config: at least one service is required")
		return nil
	}
	if root.Kind != yaml.MappingNode {
		d.add(root.Line, "", "want a mapping of keys (log, metrics, services...), got %s", describe(root))
		return nil
	}
	cfg := &Config{File: d.file}
	d.mapping("", root, map[string]field{
		"log": func(p string, v *yaml.Node) {
			d.mapping(p, v, map[string]field{
				"level":  d.str(&cfg.Log.Level),
				"format": d.str(&cfg.Log.Format),
			})
		},
		"metrics": func(p string, v *yaml.Node) {
			d.mapping(p, v, map[string]field{
				"listen": d.str(&cfg.Metrics.Listen),
			})
		},
		"drain_timeout": d.duration(&cfg.DrainTimeout),
		"transparent": func(p string, v *yaml.Node) {
			d.mapping(p, v, map[string]field{
				"mark": func(p string, v *yaml.Node) {
					m, ok := d.intValue(p, v)
					if !ok {
						return
					}
					if m < 0 || int64(m) > math.MaxUint32 {
						d.add(v.Line, p, "mark %d out of range (1-0xffffffff)", m)
						return
					}
					cfg.Transparent.Mark = uint32(m)
				},
				"table": d.integer(&cfg.Transparent.Table),
			})
		},
		"xdp": func(p string, v *yaml.Node) {
			d.mapping(p, v, map[string]field{
				"mode": d.str(&cfg.XDP.Mode),
			})
		},
		"services": func(p string, v *yaml.Node) {
			d.sequence(p, v, func(p string, item *yaml.Node) {
				if item.Kind != yaml.MappingNode {
					d.add(item.Line, p, "want a service (a mapping with name, protocol, listen, upstreams...), got %s", describe(item))
					return
				}
				s, m := d.service(p, item)
				cfg.Services = append(cfg.Services, s)
				d.svcs = append(d.svcs, m)
			})
		},
	})
	return cfg
}

func (d *decoder) service(path string, n *yaml.Node) (Service, svcMeta) {
	s := Service{Responses: -1}
	m := svcMeta{path: path}
	var proto, mode string
	d.mapping(path, n, map[string]field{
		"name":     d.str(&s.Name),
		"protocol": d.str(&proto),
		"listen": func(p string, v *yaml.Node) {
			s.Listen, _ = d.addrPort(p, v)
		},
		"mode":    d.str(&mode),
		"balance": d.str(&s.Balance),
		"upstreams": func(p string, v *yaml.Node) {
			d.sequence(p, v, func(p string, item *yaml.Node) {
				u, ok := d.upstream(p, item)
				if ok {
					s.Upstreams = append(s.Upstreams, u)
					m.ups = append(m.ups, p)
				}
			})
		},
		"connect_timeout":     d.duration(&s.ConnectTimeout),
		"timeout":             d.duration(&s.Timeout),
		"responses":           d.integer(&s.Responses),
		"next_upstream_tries": d.integer(&s.NextUpstreamTries),
		"max_conns":           d.integer(&s.MaxConns),
		"interface":           d.str(&s.Interface),
		"health": func(p string, v *yaml.Node) {
			h := &Health{}
			d.mapping(p, v, map[string]field{
				"type":     d.str(&h.Type),
				"interval": d.duration(&h.Interval),
				"timeout":  d.duration(&h.Timeout),
				"rise":     d.integer(&h.Rise),
				"fall":     d.integer(&h.Fall),
				"port": func(p string, v *yaml.Node) {
					port, ok := d.intValue(p, v)
					if !ok {
						return
					}
					if port < 1 || port > 65535 {
						d.add(v.Line, p, "port %d out of range", port)
						return
					}
					h.Port = uint16(port)
				},
				"send":   d.str(&h.Send),
				"expect": d.str(&h.Expect),
				"query":  d.str(&h.Query),
				"qtype":  d.str(&h.QType),
				"path":   d.str(&h.Path),
				"status": d.str(&h.Status),
			})
			s.Health = h
		},
		"passive": func(p string, v *yaml.Node) {
			d.mapping(p, v, map[string]field{
				"max_fails":    d.integer(&s.Passive.MaxFails),
				"fail_timeout": d.duration(&s.Passive.FailTimeout),
				"slow_start":   d.duration(&s.Passive.SlowStart),
			})
		},
		"dsr": func(p string, v *yaml.Node) {
			d.mapping(p, v, map[string]field{
				"nat": d.str(&s.DSR.NAT),
			})
		},
		"on_all_down": d.str(&s.OnAllDown),
	})
	s.Protocol = Protocol(proto)
	s.Mode = Mode(mode)
	return s, m
}

// upstream decodes "addr:port" or {address, weight, backup, down}.
func (d *decoder) upstream(path string, n *yaml.Node) (Upstream, bool) {
	u := Upstream{Weight: 1}
	switch n.Kind {
	case yaml.ScalarNode:
		if isNull(n) {
			d.add(n.Line, path, "empty upstream: want address:port or {address: ..., weight: ...}")
			return u, false
		}
		var ok bool
		u.Addr, ok = d.addrPort(path, n)
		return u, ok
	case yaml.MappingNode:
		ok := true
		d.mapping(path, n, map[string]field{
			"address": func(p string, v *yaml.Node) {
				var good bool
				if u.Addr, good = d.addrPort(p, v); !good {
					ok = false
				}
			},
			"weight": d.integer(&u.Weight),
			"backup": d.boolean(&u.Backup),
			"down":   d.boolean(&u.Down),
		})
		if !d.has(path+".address") && ok {
			d.at(path+".address", "required")
			return u, false
		}
		return u, ok
	default:
		d.add(n.Line, path, "want address:port or {address: ..., weight: ...}, got %s", describe(n))
		return u, false
	}
}

// resolve follows aliases and charges the node budget. It returns nil once
// the budget is spent; the walk then stops.
func (d *decoder) resolve(n *yaml.Node) *yaml.Node {
	for n != nil && n.Kind == yaml.AliasNode {
		n = n.Alias
		d.budget--
	}
	d.budget--
	if n == nil || d.budget < 0 {
		if !d.exhausted {
			d.exhausted = true
			d.add(1, "", "config too large: more than %d values once aliases are expanded", nodeBudget)
		}
		return nil
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.Tag == "!!null"
}

func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		if isNull(n) {
			return "nothing"
		}
		return strconv.Quote(n.Value)
	default:
		return "something else"
	}
}

// mapping decodes the keys of n with fields. Unknown and duplicate keys are
// problems; a key with a null value is treated as absent.
func (d *decoder) mapping(path string, n *yaml.Node, fields map[string]field) {
	if d.exhausted {
		return
	}
	if n.Kind != yaml.MappingNode {
		d.add(n.Line, path, "want a mapping of keys, got %s", describe(n))
		return
	}
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := d.resolve(n.Content[i]), d.resolve(n.Content[i+1])
		if k == nil || v == nil {
			return
		}
		if k.Kind != yaml.ScalarNode {
			d.add(k.Line, path, "keys must be plain names, got %s", describe(k))
			continue
		}
		p := join(path, k.Value)
		if first, dup := seen[k.Value]; dup {
			d.add(k.Line, p, "duplicate key (first at line %d)", first)
			continue
		}
		seen[k.Value] = k.Line
		fn, ok := fields[k.Value]
		switch {
		case !ok && k.Value == "<<":
			d.add(k.Line, p, "merge keys are not supported; repeat the keys")
			continue
		case !ok:
			d.add(k.Line, p, "unknown key%s", suggest(k.Value, fields))
			continue
		}
		if isNull(v) {
			continue
		}
		d.lines[p] = k.Line
		fn(p, v)
	}
}

// sequence calls fn for each item of the list n, with its path p[i].
func (d *decoder) sequence(path string, n *yaml.Node, fn func(p string, item *yaml.Node)) {
	if d.exhausted {
		return
	}
	if n.Kind != yaml.SequenceNode {
		d.add(n.Line, path, "want a list, got %s", describe(n))
		return
	}
	for i, item := range n.Content {
		if item = d.resolve(item); item == nil {
			return
		}
		p := fmt.Sprintf("%s[%d]", path, i)
		d.lines[p] = item.Line
		fn(p, item)
	}
}

func (d *decoder) scalar(path string, v *yaml.Node, want string) (string, bool) {
	if v.Kind != yaml.ScalarNode {
		d.add(v.Line, path, "want %s, got %s", want, describe(v))
		return "", false
	}
	return v.Value, true
}

func (d *decoder) str(dst *string) field {
	return func(p string, v *yaml.Node) {
		if s, ok := d.scalar(p, v, "a string"); ok {
			*dst = s
		}
	}
}

func (d *decoder) integer(dst *int) field {
	return func(p string, v *yaml.Node) {
		if i, ok := d.intValue(p, v); ok {
			*dst = i
		}
	}
}

// intValue decodes an integer scalar, reporting anything else.
func (d *decoder) intValue(p string, v *yaml.Node) (int, bool) {
	s, ok := d.scalar(p, v, "an integer")
	if !ok {
		return 0, false
	}
	var i int64
	if v.Tag != "!!int" || v.Decode(&i) != nil {
		d.add(v.Line, p, "want an integer, got %q", s)
		return 0, false
	}
	return int(i), true
}

// addrPort decodes an address:port scalar, reporting anything else.
func (d *decoder) addrPort(p string, v *yaml.Node) (netip.AddrPort, bool) {
	s, ok := d.scalar(p, v, "address:port")
	if !ok {
		return netip.AddrPort{}, false
	}
	ap, msg := parseAddrPort(s)
	if msg != "" {
		d.add(v.Line, p, "%s", msg)
		return ap, false
	}
	return ap, true
}

func (d *decoder) boolean(dst *bool) field {
	return func(p string, v *yaml.Node) {
		s, ok := d.scalar(p, v, "true or false")
		if !ok {
			return
		}
		if v.Tag != "!!bool" || v.Decode(dst) != nil {
			d.add(v.Line, p, "want true or false, got %q", s)
		}
	}
}

func (d *decoder) duration(dst *time.Duration) field {
	return func(p string, v *yaml.Node) {
		s, ok := d.scalar(p, v, "a duration")
		if !ok {
			return
		}
		if v.Tag == "!!int" && s == "0" {
			*dst = 0
			return
		}
		dur, err := time.ParseDuration(s)
		if v.Tag != "!!str" || err != nil {
			d.add(v.Line, p, "want a duration like 1s or 500ms, got %q", s)
			return
		}
		*dst = dur
	}
}

const addrHint = "want address:port, e.g. 198.18.98.10:80 or [2001:db8::10]:53"

// parseAddrPort parses an IP address and port; msg explains what is wrong.
func parseAddrPort(s string) (ap netip.AddrPort, msg string) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		if _, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")); err == nil {
			return ap, fmt.Sprintf("%q has no port (%s)", s, addrHint)
		}
		return ap, fmt.Sprintf("%q is not an address:port (%s)", s, addrHint)
	}
	if host == "" {
		return ap, fmt.Sprintf("%q has no address (use 0.0.0.0:%s or [::]:%s for every address)", s, port, port)
	}
	a, err := netip.ParseAddr(host)
	if err != nil {
		return ap, fmt.Sprintf("%q is not an IP address (%s; names are not resolved)", host, addrHint)
	}
	n, err := strconv.ParseUint(port, 10, 64)
	switch {
	case errors.Is(err, strconv.ErrRange):
		return ap, fmt.Sprintf("port %s out of range", port)
	case err != nil:
		return ap, fmt.Sprintf("%q is not a port number", port)
	case n == 0 || n > 65535:
		return ap, fmt.Sprintf("port %d out of range", n)
	}
	return netip.AddrPortFrom(a, uint16(n)), ""
}

// suggest returns ` (did you mean "x"?)` for the known key closest to key,
// or "" when none is close.
func suggest(key string, fields map[string]field) string {
	// Short keys get no suggestion from far away ("g" is not "log").
	best, bestDist := "", min(3, len(key)/2+1)
	names := make([]string, 0, len(fields))
	for name := range fields {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		dist := editDistance(strings.ToLower(key), name)
		if strings.HasPrefix(name, strings.ToLower(key)) && len(key) >= 3 && dist > 1 {
			dist = 1
		}
		if dist < bestDist {
			best, bestDist = name, dist
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %q?)", best)
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	if len(a) > 64 || len(b) > 64 {
		return math.MaxInt32
	}
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
