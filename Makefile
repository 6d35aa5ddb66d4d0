# lbctl — build, test, benchmark. `make help` lists the targets.
GO      ?= go
CLANG   ?= clang-19
BIN     ?= bin/lbctl
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X main.version=$(VERSION)

.PHONY: help build generate check-generated test test-unit bench demo fuzz vet clean image

help:
	@echo "make build            build bin/lbctl (no clang needed: BPF objects are committed)"
	@echo "make generate         recompile bpf/*.c with $(CLANG) through bpf2go"
	@echo "make check-generated  regenerate and fail if the committed objects are stale"
	@echo "make test             every test (root needed for the BPF and namespace ones)"
	@echo "make test-unit        tests that need no privileges"
	@echo "make bench            benchmarks: BPF_PROG_TEST_RUN ns/packet, lbctl vs nginx"
	@echo "make demo             the seed's setup on a namespace topology, with lbctl in front (DEMO_ARGS=--hold keeps it up)"
	@echo "make fuzz             run each fuzz target for FUZZTIME (default 30s)"

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/lbctl

generate:
	BPF2GO_CC=$(CLANG) $(GO) generate ./pkg/dataplane/...

check-generated: generate
	@git diff --exit-code --stat -- pkg/dataplane || \
		{ echo "generated BPF objects are stale: run 'make generate' and commit the result"; exit 1; }

vet:
	$(GO) vet ./...

# The whole suite. Tests needing root skip on a laptop and fail when CI=true.
test: vet
	$(GO) test -count=1 -timeout 15m ./...

test-unit:
	$(GO) test -count=1 -short ./...

FUZZTIME ?= 30s
fuzz:
	@for pkg in $$($(GO) list ./...); do \
		for f in $$($(GO) test -list '^Fuzz' $$pkg 2>/dev/null | grep '^Fuzz'); do \
			echo "== $$pkg $$f"; $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
		done; \
	done

bench: build
	bash scripts/bench.sh

DEMO_ARGS ?=
demo: build
	BIN=$(BIN) bash scripts/demo.sh $(DEMO_ARGS)

image:
	podman build -t lbctl:$(VERSION) .

clean:
	rm -rf bin
