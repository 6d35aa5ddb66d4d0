package main

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"text/template"

	"github.com/lbctl/lbctl/test/topo"
)

// nginxConfig is what the benchmark's nginx.conf is rendered from.
type nginxConfig struct {
	Dir         string // prefix: pid, error log and temp paths live here
	Workers     int    // worker_processes: one per core, like the seed
	Module      string // path of ngx_stream_module.so (Debian's libnginx-mod-stream)
	Transparent bool   // proxy_bind $remote_addr transparent (workers run as root)
	Servers     []nginxServer
}

// nginxServer is one stream server block and its upstream group.
type nginxServer struct {
	Name      string // upstream name
	Listen    netip.AddrPort
	UDP       bool
	Upstreams []netip.AddrPort
}

// nginxModule is where Debian's libnginx-mod-stream installs the module.
const nginxModule = "/usr/lib/nginx/modules/ngx_stream_module.so"

var nginxTemplate = template.Must(template.New("nginx.conf").Parse(`# nginx for lbctl's benchmark (test/bench): the seed's {{if .Transparent}}transparent{{else}}standard{{end}} proxy.
daemon off;
master_process on;
worker_processes {{.Workers}};
worker_rlimit_nofile 16384;
{{- if .Transparent}}
user root;  # IP_TRANSPARENT needs the workers to keep CAP_NET_ADMIN
{{- end}}
pid {{.Dir}}/nginx.pid;
error_log {{.Dir}}/error.log warn;
load_module {{.Module}};

events {
    worker_connections 8192;
}

stream {
{{- range .Servers}}

    upstream {{.Name}} {
{{- range .Upstreams}}
        server {{.}};
{{- end}}
    }

    server {
        listen {{.Listen}}{{if .UDP}} udp{{end}};
{{- if .UDP}}
        proxy_responses 1;
        proxy_timeout 1s;
{{- end}}
{{- if $.Transparent}}
        proxy_bind $remote_addr transparent;
{{- end}}
        proxy_pass {{.Name}};
    }
{{- end}}
}
`))

// renderNginx returns the nginx.conf text for c.
func renderNginx(c nginxConfig) (string, error) {
	var b bytes.Buffer
	if err := nginxTemplate.Execute(&b, c); err != nil {
		return "", fmt.Errorf("render nginx.conf: %w", err)
	}
	return b.String(), nil
}

// startNginx writes c under DIR/<name>/ and runs nginx on the LB, with its
// own prefix, pid file and error log (never the system's nginx or its
// files), until the scenario's cleanup.
func (e *env) startNginx(ctx context.Context, name string, c nginxConfig) (*proc, error) {
	c.Dir = filepath.Join(e.dir, name)
	if err := os.MkdirAll(c.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("start nginx: %w", err)
	}
	if c.Module == "" {
		c.Module = nginxModule
	}
	text, err := renderNginx(c)
	if err != nil {
		return nil, err
	}
	conf := filepath.Join(c.Dir, "nginx.conf")
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		return nil, fmt.Errorf("start nginx: %w", err)
	}
	args := []string{"-p", c.Dir + "/", "-c", conf, "-e", filepath.Join(c.Dir, "error.log")}
	if _, err := e.run(ctx, e.topo.LB, "nginx", append([]string{"-t", "-q"}, args...)...); err != nil {
		return nil, fmt.Errorf("check %s: %w", conf, err)
	}
	return e.start(e.topo.LB, name, "nginx", args...)
}

// seedUpstreams is the first n backends' ADDR:port in one family.
func seedUpstreams(n int, v6 bool, port uint16) []netip.AddrPort {
	var out []netip.AddrPort
	for i := 1; i <= n; i++ {
		a := topo.Backend4(i)
		if v6 {
			a = topo.Backend6(i)
		}
		out = append(out, netip.AddrPortFrom(a, port))
	}
	return out
}
