// Package balance chooses an upstream for a new connection or UDP session.
// It is pure Go with no I/O: smooth weighted round robin (nginx's
// algorithm), weighted least connections, random of two choices and Maglev
// consistent hashing.
//
// A Balancer sees the upstreams as a slice of Upstream, the state at the
// moment of the pick: Down (health or config says so), the effective Weight
// (slow start may lower it) and the Active connection count. Index i of the
// slice is the upstream's identity: a Balancer keeps per-index state, so a
// caller keeps the order stable and makes a new Balancer when the set changes.
//
// Eligibility: an upstream is eligible when it is not Down, has a Weight
// above zero and the caller's skip function (the upstreams already tried for
// this connection) does not exclude it. Backups are considered only when no
// primary is eligible: every primary is down or already tried.
package balance

import (
	"fmt"
	"hash/fnv"
	"net/netip"
)

// Algorithm names, as the config's balance key spells them.
const (
	RoundRobin = "round_robin"
	LeastConn  = "least_conn"
	RandomTwo  = "random_two"
	Hash       = "hash"
)

// Upstream is one server as a Balancer sees it at the moment of a pick.
type Upstream struct {
	Addr   netip.AddrPort
	Weight int   // effective weight; 0 = not eligible
	Backup bool  // used only when no primary is eligible
	Down   bool  // marked down by config or health
	Active int64 // open connections/sessions (least_conn, random_two)
}

// Skip reports whether upstream i must not be picked (already tried). A nil
// Skip excludes nothing.
type Skip func(i int) bool

// Balancer picks an upstream. Pick returns the index into ups of the chosen
// upstream, or -1 when none is eligible. key is the client's hash key (see
// Key); only the hash algorithm uses it. Balancers are safe for concurrent use.
type Balancer interface {
	Pick(ups []Upstream, key uint64, skip Skip) int
}

// New returns the balancer named by algorithm (round_robin, least_conn,
// random_two or hash).
func New(algorithm string) (Balancer, error) {
	switch algorithm {
	case RoundRobin, "":
		return &SmoothWeighted{}, nil
	case LeastConn:
		return &LeastConnections{}, nil
	case RandomTwo:
		return NewRandomTwo(0), nil
	case Hash:
		return &MaglevHash{}, nil
	}
	return nil, fmt.Errorf("balance %q: unknown algorithm (want round_robin, least_conn, random_two or hash)", algorithm)
}

// Key hashes a client address into the key of the hash algorithm. withPort
// keys on address:port (one flow), otherwise on the address alone (every
// flow of one client goes to one upstream).
func Key(client netip.AddrPort, withPort bool) uint64 {
	h := fnv.New64a()
	a := client.Addr().Unmap().As16()
	h.Write(a[:])
	if withPort {
		p := client.Port()
		h.Write([]byte{byte(p >> 8), byte(p)})
	}
	return mix(h.Sum64())
}

// mix is the finalizer of SplitMix64: FNV alone leaves the low bits of
// similar inputs correlated.
func mix(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// eligible reports whether ups[i] may be picked in tier backup.
func eligible(ups []Upstream, i int, skip Skip, backup bool) bool {
	u := &ups[i]
	return u.Backup == backup && !u.Down && u.Weight > 0 && (skip == nil || !skip(i))
}

// tier returns which tier to pick from: primaries when any is eligible,
// else backups. ok is false when nothing at all is eligible.
func tier(ups []Upstream, skip Skip) (backup, ok bool) {
	anyBackup := false
	for i := range ups {
		if eligible(ups, i, skip, false) {
			return false, true
		}
		if !anyBackup && eligible(ups, i, skip, true) {
			anyBackup = true
		}
	}
	return true, anyBackup
}
