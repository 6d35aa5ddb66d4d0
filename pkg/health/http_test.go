package health

import (
	"errors"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/lbctl/lbctl/pkg/config"
)

func TestHTTPCheck(t *testing.T) {
	tp := testTopo(t)
	ln := listenIn(t, tp.Backends[0], "tcp", "198.19.16.11:7401")
	mux := http.NewServeMux()
	mux.HandleFunc("/{$}", func(w http.ResponseWriter, r *http.Request) {
		_, _ = w.Write([]byte("Hello from dev1. You connected from " + r.RemoteAddr + "\n"))
	})
	mux.HandleFunc("/broken", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "database unreachable", http.StatusInternalServerError)
	})
	mux.HandleFunc("/moved", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "/elsewhere", http.StatusFound)
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		select { // longer than the check's timeout; ends with the request
		case <-r.Context().Done():
		case <-time.After(5 * time.Second):
		}
	})
	mux.HandleFunc("/reset", func(w http.ResponseWriter, r *http.Request) {
		c, _, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		_ = c.(*net.TCPConn).SetLinger(0) // close with RST
		c.Close()
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("serve: %v", err)
		}
	}()
	t.Cleanup(func() { srv.Close(); wg.Wait() })

	get := func(path, status, expect string) config.Health {
		if status == "" {
			status = config.DefaultHTTPStatus
		}
		return config.Health{Type: "http", Path: path, Status: status, Expect: expect}
	}
	const addr = "198.19.16.11:7401"
	for _, c := range []checkCase{
		{name: "ok", health: get("/", "", ""), addr: addr},
		{name: "body matches", health: get("/", "200", "Hello from dev1"), addr: addr},
		{name: "body matches regexp", health: get("/", "", `/from 198\.19\.16\.1:\d+/`), addr: addr},
		{name: "wrong body", health: get("/", "", "Hello from dev2"), addr: addr, wantErr: `GET /: body "Hello from dev1`},
		{name: "wrong status", health: get("/broken", "", ""), addr: addr, wantErr: "GET /broken: status 500, want 200-399"},
		{name: "status range", health: get("/broken", "500-503", "unreachable"), addr: addr},
		{name: "redirect not followed", health: get("/moved", "200", ""), addr: addr, wantErr: "status 302, want 200-200"},
		{name: "not found", health: get("/nothing", "", ""), addr: addr, wantErr: "status 404"},
		{name: "timeout", health: get("/slow", "", ""), addr: addr, wantErr: "timeout"},
		{name: "reset", health: get("/reset", "", ""), addr: addr, wantErr: "GET /reset: connection reset by peer"},
		{name: "refused", health: get("/", "", ""), addr: "198.19.16.11:7402", wantErr: "connection refused"},
	} {
		t.Run(c.name, func(t *testing.T) { c.run(t, tp) })
	}
}
