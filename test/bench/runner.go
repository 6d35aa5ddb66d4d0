package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/lbctl/lbctl/test/topo"
)

// scenario is one group of benchmark lines: it sets up what it measures
// (a proxy, BPF rules, ...) on the shared topology, runs the loads, and
// undoes its set-up through env.cleanup before the next scenario starts.
type scenario struct {
	name string // matched by -run
	// needs says why the scenario cannot run on this build ("" = it can),
	// e.g. a mode that has not landed yet.
	needs func(ctx context.Context, e *env) string
	run   func(ctx context.Context, e *env) ([]result, error)
}

// env is what a scenario gets: the topology, the tools and a cleanup
// stack. Everything a scenario starts goes through start or cleanup, so
// it is undone on every exit path (error, Ctrl-C, normal end).
type env struct {
	log      *zap.Logger
	topo     *topo.Topology
	dir      string // temp dir of this run: configs, logs, nginx prefix
	duration time.Duration
	lbctl    string // the lbctl binary
	dpTest   string // the compiled pkg/dataplane test binary
	loads    loadParams
	lines    *regexp.Regexp // the load lines to run (-loads); nil = all

	mu       sync.Mutex
	cleanups []func()
}

// loadParams is the load every traffic line uses, the same for every path.
type loadParams struct {
	dnsClients     int // dnsperf -c: client source ports
	dnsOutstanding int // dnsperf -q: queries in flight
	dnsProcs       int // dnsperf processes (one thread each)
	wrkConns       int // wrk -c: connections
	wrkThreads     int // wrk -t
}

// addCleanup pushes fn on the cleanup stack (run last-in first-out).
func (e *env) addCleanup(fn func()) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.cleanups = append(e.cleanups, fn)
}

// mark returns the current depth of the cleanup stack, for undo.
func (e *env) mark() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return len(e.cleanups)
}

// undo runs the cleanups pushed since mark, newest first.
func (e *env) undo(mark int) {
	for {
		e.mu.Lock()
		if len(e.cleanups) <= mark {
			e.mu.Unlock()
			return
		}
		fn := e.cleanups[len(e.cleanups)-1]
		e.cleanups = e.cleanups[:len(e.cleanups)-1]
		e.mu.Unlock()
		fn()
	}
}

// command returns a command running name in host's namespace, in its own
// process group (so stopping it also stops what it forked, e.g. nginx's
// workers), killed with the group when ctx ends.
func (e *env) command(ctx context.Context, h *topo.Host, name string, args ...string) *exec.Cmd {
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// logFile opens a log file under the run's dir.
func (e *env) logFile(name string) (*os.File, error) {
	return os.Create(filepath.Join(e.dir, name+".log"))
}

// start runs a long-lived program (backend, nginx, lbctl run) in host's
// namespace, its output in DIR/<logname>.log. It is stopped with SIGTERM
// (SIGKILL to its process group after 5 s) by the cleanup stack. ctx is
// not tied to the process: stopping is the cleanup's job.
func (e *env) start(h *topo.Host, logname, name string, args ...string) (*proc, error) {
	f, err := e.logFile(logname)
	if err != nil {
		return nil, fmt.Errorf("start %s: %w", logname, err)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", h.NS, name}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s in %s: %w", name, h.NS, err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); f.Close(); close(done) }()
	p := &proc{name: logname, log: f.Name(), done: done}
	e.addCleanup(func() {
		pgid := cmd.Process.Pid
		_ = syscall.Kill(pgid, syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(5 * time.Second):
			e.log.Warn("did not stop on SIGTERM, killing", zap.String("program", logname))
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-done
		}
		// Whatever it forked and left behind (its group) goes too.
		_ = syscall.Kill(-pgid, syscall.SIGKILL)
	})
	return p, nil
}

// proc is a program started by env.start.
type proc struct {
	name, log string
	done      chan struct{} // closed when it has exited
}

// alive returns an error naming the log when the program has already
// ended (it failed to start, or crashed).
func (p *proc) alive() error {
	select {
	case <-p.done:
		return fmt.Errorf("%s exited: see %s", p.name, p.log)
	default:
		return nil
	}
}

// run runs a short command in host's namespace and returns its output.
func (e *env) run(ctx context.Context, h *topo.Host, name string, args ...string) (string, error) {
	out, err := e.command(ctx, h, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s in %s: %w: %s", name, strings.Join(args, " "), h.Role, err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// runAll runs each command in order, stopping at the first error.
func (e *env) runAll(ctx context.Context, h *topo.Host, cmds [][]string) error {
	for _, c := range cmds {
		if _, err := e.run(ctx, h, c[0], c[1:]...); err != nil {
			return err
		}
	}
	return nil
}

// waitFor polls probe until it succeeds, ctx ends, one of procs exits or
// 15 s pass.
func waitFor(ctx context.Context, what string, probe func() error, procs ...*proc) error {
	deadline := time.Now().Add(15 * time.Second)
	var err error
	for {
		if err = probe(); err == nil {
			return nil
		}
		for _, p := range procs {
			if perr := p.alive(); perr != nil {
				return fmt.Errorf("wait for %s: %w", what, perr)
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("wait for %s: %w", what, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// runScenarios runs every scenario whose name matches, in order, and
// returns all lines; a scenario that fails or cannot run leaves a note.
func runScenarios(ctx context.Context, e *env, list []scenario, match func(string) bool) ([]result, []string) {
	var all []result
	var notes []string
	for _, s := range list {
		if !match(s.name) {
			continue
		}
		if ctx.Err() != nil {
			break
		}
		if s.needs != nil {
			if why := s.needs(ctx, e); why != "" {
				e.log.Warn("scenario not run", zap.String("scenario", s.name), zap.String("why", why))
				notes = append(notes, fmt.Sprintf("%s: not run: %s", s.name, why))
				continue
			}
		}
		e.log.Info("scenario", zap.String("name", s.name))
		m := e.mark()
		rs, err := s.run(ctx, e)
		e.undo(m)
		all = append(all, rs...)
		if err != nil && !errors.Is(err, context.Canceled) {
			e.log.Error("scenario failed", zap.String("scenario", s.name), zap.Error(err))
			notes = append(notes, fmt.Sprintf("%s: failed: %v", s.name, err))
		}
	}
	return all, notes
}
