// The per-packet floor of `cargo xtask bench`: cgroup_skb programs that do nothing but let the
// packet through. Attached in multi mode to the same cgroup v2 root as droptrace's tns_ingress
// and tns_egress during the same iperf3 run, their BPF ns per run (kernel.bpf_stats_enabled)
// is what bpf_stats and the cgroup_skb dispatch cost before a program does any work.
// Built by the bench with: clang -O2 -g -target bpf -c
#include <linux/bpf.h>

#define SEC(name) __attribute__((section(name), used))

SEC("cgroup_skb/ingress")
int empty_ingress(struct __sk_buff *skb)
{
	return 1;
}

SEC("cgroup_skb/egress")
int empty_egress(struct __sk_buff *skb)
{
	return 1;
}

char _license[] SEC("license") = "GPL";
