package dataplane

// One bpf2go line per BPF object; Go types come from the C structs in
// bpf/lib/maps.h. `make generate` reruns these and CI diffs the result.

//go:generate go tool bpf2go -cc clang-19 -target bpfel -type snat_key -type snat_value -type snat_frag_key -type snat_frag_value -type rule_stats -type snat_counter snat ../../bpf/snat.c -- -I../../bpf/lib -I/usr/include/x86_64-linux-gnu
