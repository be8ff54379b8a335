// The floors of `cargo xtask bench`: programs that do nothing, on droptrace's hooks.
// - empty_ingress / empty_egress: cgroup_skb programs that let the packet through. Attached in
//   multi mode to the same cgroup v2 root as droptrace's tns_ingress and tns_egress during the
//   same iperf3 run, their BPF ns per run (kernel.bpf_stats_enabled) is what bpf_stats and the
//   cgroup_skb dispatch cost before a program does any work.
// - empty_kfree_skb: a raw tracepoint program on skb:kfree_skb (the dispatch droptrace's BTF
//   tracepoint program goes through). With the two above, a flood's CPU per drop under
//   programs that do nothing on every hook droptrace uses: the per-drop floor.
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

SEC("raw_tracepoint/kfree_skb")
int empty_kfree_skb(void *ctx)
{
	return 0;
}

char _license[] SEC("license") = "GPL";
