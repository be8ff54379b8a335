// Test-only tc classifier: drops TCP to one destination port the way eBPF dataplanes
// (Cilium, Calico eBPF) drop, by returning TC_ACT_SHOT in direct-action mode.
// This kernel has cls_bpf but neither act_gact nor flower, so `tc ... action drop` is not an
// option. Built by the test fixture with: clang -O2 -target bpf -DDROP_PORT=N -c
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/pkt_cls.h>

#define SEC(name) __attribute__((section(name), used))

static long (*bpf_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) = (void *)26;

#ifndef DROP_PORT
#define DROP_PORT 1521
#endif

SEC("tc")
int drop_port(struct __sk_buff *skb)
{
	__u8 b[2];
	__u32 l4;

	if (skb->protocol == __builtin_bswap16(ETH_P_IP)) {
		__u8 vihl, proto;
		if (bpf_skb_load_bytes(skb, ETH_HLEN, &vihl, 1) ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + 9, &proto, 1) || proto != IPPROTO_TCP)
			return TC_ACT_OK;
		l4 = ETH_HLEN + (vihl & 0x0f) * 4;
	} else if (skb->protocol == __builtin_bswap16(ETH_P_IPV6)) {
		__u8 next;
		if (bpf_skb_load_bytes(skb, ETH_HLEN + 6, &next, 1) || next != IPPROTO_TCP)
			return TC_ACT_OK;
		l4 = ETH_HLEN + 40;
	} else {
		return TC_ACT_OK;
	}
	if (bpf_skb_load_bytes(skb, l4 + 2, b, 2))
		return TC_ACT_OK;
	return ((b[0] << 8) | b[1]) == DROP_PORT ? TC_ACT_SHOT : TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
