// Test-only cgroup_skb program standing in for another agent on the node (a CNI's host
// firewall, systemd's IP accounting): counts every packet it sees in COUNTS[0] and lets it
// through. Loaded, pinned and attached in multi mode with bpftool by the coexistence tests.
// Built by the test fixture with: clang -O2 -target bpf -c
#include <linux/bpf.h>

#define SEC(name) __attribute__((section(name), used))

static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;

struct {
	int (*type)[BPF_MAP_TYPE_ARRAY];
	int (*max_entries)[1];
	__u32 *key;
	__u64 *value;
} counts SEC(".maps");

SEC("cgroup_skb/ingress")
int count_packets(struct __sk_buff *skb)
{
	__u32 key = 0;
	__u64 *n = bpf_map_lookup_elem(&counts, &key);

	if (n)
		__sync_fetch_and_add(n, 1);
	return 1;
}

char _license[] SEC("license") = "GPL";
