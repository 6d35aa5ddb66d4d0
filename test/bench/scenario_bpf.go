package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"time"
)

// bpfScenario runs pkg/dataplane's own benchmarks (BenchmarkSNAT,
// BenchmarkSteer, and BenchmarkXDPLB when it exists) from the compiled
// test binary, in the LB namespace, and reports ns/packet next to the
// empty program each benchmark measures in the same run (its x-empty
// metric). The method (rule whose target equals its match, one
// BPF_PROG_TEST_RUN call of b.N repeats) is the benchmarks', not redone here.
var bpfScenario = scenario{
	name: "bpf",
	needs: func(ctx context.Context, e *env) string {
		if _, err := os.Stat(e.dpTest); err != nil {
			return fmt.Sprintf("no pkg/dataplane test binary (%v): build it with go test -c -o %s ./pkg/dataplane", err, e.dpTest)
		}
		return ""
	},
	run: func(ctx context.Context, e *env) ([]result, error) {
		count, benchtime := 3, time.Second
		if e.duration < 5*time.Second { // smoke runs
			count, benchtime = 1, 100*time.Millisecond
		}
		out, err := e.run(ctx, e.topo.LB, e.dpTest, "-test.run", "^$",
			"-test.bench", "^Benchmark(SNAT|Steer|XDPLB)$", "-test.count", fmt.Sprint(count),
			"-test.benchtime", benchtime.String())
		if f, ferr := e.logFile("bpf-benchmarks"); ferr == nil {
			_, _ = f.WriteString(out)
			f.Close()
		}
		if err != nil {
			return nil, err
		}
		samples, err := parseGoBench(bytes.NewReader([]byte(out)))
		if err != nil {
			return nil, err
		}
		rs := bpfResults(samples)
		if len(rs) == 0 {
			return nil, fmt.Errorf("no ns/packet benchmark in the output of %s", e.dpTest)
		}
		return rs, nil
	},
}
