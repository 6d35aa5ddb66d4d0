// Package health decides which upstreams of a service may be chosen: active
// checks (tcp, udp, dns, http), nginx's passive max_fails/fail_timeout
// accounting, slow start and the all-down rule. docs/health.md describes
// the semantics for operators.
//
// # One Tracker per service, one Checker per process
//
//	tr, err := health.NewTracker(svc, health.Options{Log: log})  // svc is a config.Service
//	checker := health.NewChecker(health.CheckerOptions{Log: log}) // once, for every service
//	checker.Add(tr)                                               // runs svc.Health, if any
//	defer func() { checker.Remove(tr); tr.Close() }()
//
// Upstreams are named by their index in svc.Upstreams.
//
// # Readers
//
// The front end (pkg/proxy) asks at every choice:
//
//	tr.Eligible(i) // may i be chosen now (all-down rule applied; `down: true` never)
//	tr.Weight(i)   // effective weight in WeightScale units (slow start ramp), 0 if not eligible
//
// and reports what it sees (passive checks; no-ops when max_fails is 0):
//
//	tr.ReportFailure(i) // connect failed, or a UDP session got no reply within timeout
//	tr.ReportSuccess(i) // connected, or got a reply
//
// Table builders (the XDP Maglev table, DSR backend lists) subscribe and
// rebuild from the Change they get, in order, for every transition and
// every slow-start step:
//
//	cancel := tr.Subscribe(func(c health.Change) { ... c.Index, c.Eligible, c.Weight ... })
//
// The callback runs on the goroutine that caused the change: it must return
// quickly and must not call ReportFailure/ReportSuccess; reading the tracker
// is fine. Status and metrics read tr.Snapshot(): per upstream the state,
// since when, eligibility, weight, the last active check's time, result and
// latency, and the passive failure count.
//
// # States
//
// An upstream is up, down, on probation (a passive fail_timeout ran out:
// chosen again, its next result decides) or disabled (`down: true` in the
// config: never checked, never chosen). Every upstream starts up, so
// traffic flows at once; a dead one is found by its first fall checks.
// Active checks take an upstream down after `fall` failures in a row and
// up after `rise` passes in a row. Passive accounting takes it down for
// fail_timeout after max_fails failures within fail_timeout of the first.
// Both must agree for it to be up. Coming back (down or probation -> up)
// starts slow start: Weight grows linearly from 1 to full over
// passive.slow_start, published in ten steps.
//
// When every upstream not disabled is down, Eligible returns true for all
// of them (nginx: try them anyway) unless on_all_down is reject; either
// way the tracker logs it once, at error level, per episode.
//
// # Checks
//
// The Checker runs every check on one scheduler goroutine and a fixed pool
// of workers (CheckerOptions.Workers), so the number of goroutines does not
// grow with the number of upstreams. Each upstream is first checked at a
// random point within its interval, then every interval ± 10% (jitter), so
// upstreams are not probed in lockstep. A check opens an ordinary socket
// (CheckerOptions.Dialer, default net.Dialer): it comes from the load
// balancer's own address, never a client's. A check's timeout bounds
// everything it does (connect, send, wait for the reply, read the body).
//
//   - tcp: passes when the connection is established.
//   - udp: sends `send` (an empty datagram if unset) and passes on a reply
//     that contains `expect` (or matches /regexp/); any reply when unset.
//     An ICMP port unreachable fails it at once; silence fails at timeout.
//   - dns: asks `query`/`qtype` (RD set, random ID) and passes on a reply
//     to that ID and question with rcode NOERROR and, if `expect` is set,
//     an answer of that type whose value equals it (names without case or
//     trailing dot) or matches /regexp/.
//   - http: GET `path` (HTTP/1.1, no keep-alive) and passes on a status
//     within `status` and, if `expect` is set, a body whose first 64 KiB
//     contain it (or match /regexp/).
package health
