//! sock:inet_sock_set_state and tcp:tcp_retransmit_skb: the TCP lifecycle of watched flows.
use std::{collections::HashMap, path::Path};

use tracer_common::{ABSENT, RetransmitEvent, StateEvent, TcpLayout, TpTuple};

use super::LayoutError;
use crate::{
    decode::{self, Owner, RetransmitSignal, StateSignal, TcpState},
    kernel::{btf::KernelBtf, tracefs::Format},
};

pub const STATE_CATEGORY: &str = "sock";
pub const STATE_TRACEPOINT: &str = "inet_sock_set_state";
pub const STATE_PROGRAM: &str = "inet_sock_set_state";
pub const RETRANSMIT_CATEGORY: &str = "tcp";
pub const RETRANSMIT_TRACEPOINT: &str = "tcp_retransmit_skb";
pub const RETRANSMIT_PROGRAM: &str = "tcp_retransmit_skb";

/// The tuple fields of a TCP tracepoint record. `family` may be absent (then [`ABSENT`]):
/// the caller says where the family comes from instead.
fn tp_tuple(f: &Format) -> Result<TpTuple, LayoutError> {
    Ok(TpTuple {
        family: f.offset("family").unwrap_or(ABSENT),
        sport: f.offset("sport")?,
        dport: f.offset("dport")?,
        saddr: f.offset("saddr")?,
        daddr: f.offset("daddr")?,
        saddr_v6: f.offset("saddr_v6").unwrap_or(ABSENT),
        daddr_v6: f.offset("daddr_v6").unwrap_or(ABSENT),
        _pad: 0,
    })
}

/// TCP state names ("SYN_SENT", ...) by value, from the tracepoint's print format.
pub type StateNames = HashMap<u32, String>;

/// The socket offsets both TCP programs read (from BTF); each hook's record part is added by
/// [`resolve_lifecycle`] and [`resolve_retransmit`], which fail independently.
pub fn resolve_socket(btf: &KernelBtf) -> Result<TcpLayout, LayoutError> {
    Ok(TcpLayout {
        sk_err: btf.member_offset("sock", "sk_err")?,
        snd_una: btf.member_offset("tcp_sock", "snd_una")?,
        sk_net: btf.member_offset("sock", "__sk_common.skc_net.net")?,
        net_inum: btf.member_offset("net", "ns.inum")?,
        valid: 1,
        ..TcpLayout::UNSET
    })
}

/// TCP state names by value from a record's `__print_symbolic(REC->FIELD, ...)`.
pub fn state_names(f: &Format, field: &str) -> StateNames {
    f.symbols(field)
        .into_iter()
        .map(|(v, n)| (v as u32, n.trim_start_matches("TCP_").to_string()))
        .collect()
}

/// Adds the inet_sock_set_state part (record offsets, SYN_SENT and CLOSE values).
pub fn resolve_lifecycle(l: &mut TcpLayout, state: &Format) -> Result<StateNames, LayoutError> {
    let value = |name: &str| -> Result<u32, LayoutError> {
        Ok(state.symbol_value("newstate", &format!("TCP_{name}"))? as u32)
    };
    // The lifecycle record has carried `family` since it exists (4.16).
    l.st = TpTuple {
        family: state.offset("family")?,
        ..tp_tuple(state)?
    };
    l.st_skaddr = state.offset("skaddr")?;
    l.st_oldstate = state.offset("oldstate")?;
    l.st_newstate = state.offset("newstate")?;
    l.st_protocol = state.offset("protocol")?;
    l.syn_sent = value("SYN_SENT")?;
    l.close = value("CLOSE")?;
    Ok(state_names(state, "newstate"))
}

/// How a kernel's tcp_retransmit_skb record gives the address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetransmitFamily {
    /// The record's own `family` field (5.13 and later).
    Record,
    /// No such field (5.10): read from the socket, `sk->__sk_common.skc_family`.
    Socket,
}

/// Adds the tcp_retransmit_skb part to a lifecycle layout.
pub fn resolve_retransmit(
    l: &mut TcpLayout,
    rt: &Format,
    btf: &KernelBtf,
) -> Result<RetransmitFamily, LayoutError> {
    let tuple = tp_tuple(rt)?;
    let family = if tuple.family == ABSENT {
        l.sk_family = btf.member_offset("sock", "__sk_common.skc_family")?;
        RetransmitFamily::Socket
    } else {
        RetransmitFamily::Record
    };
    l.rt_skaddr = rt.offset("skaddr")?;
    l.rt_state = rt.offset("state")?;
    l.rt = tuple;
    Ok(family)
}

pub fn read_formats(tracefs: &Path) -> (Result<Format, LayoutError>, Result<Format, LayoutError>) {
    (
        Format::read(tracefs, STATE_CATEGORY, STATE_TRACEPOINT).map_err(Into::into),
        Format::read(tracefs, RETRANSMIT_CATEGORY, RETRANSMIT_TRACEPOINT).map_err(Into::into),
    )
}

fn state(names: &StateNames, value: u32) -> TcpState {
    let name = names
        .get(&value)
        .cloned()
        .unwrap_or_else(|| format!("STATE_{value}"));
    TcpState::new(value, name)
}

fn owner(has: u32, o: &tracer_common::Owner) -> Option<Owner> {
    (has != 0).then(|| Owner {
        pid: o.pid,
        tgid: o.tgid,
        comm: decode::comm(&o.comm),
        cgroup_id: o.cgroup_id,
        container_id: None,
        pod_uid: None,
    })
}

pub fn decode_state(rec: &StateEvent, names: &StateNames) -> StateSignal {
    StateSignal {
        ts_ns: rec.hdr.ts_ns,
        sk: rec.sk,
        flow: decode::flow_key(&rec.flow),
        old: state(names, rec.oldstate),
        new: state(names, rec.newstate),
        sk_err: rec.sk_err,
        netns: rec.netns,
        owner: owner(rec.has_owner, &rec.owner),
    }
}

pub fn decode_retransmit(rec: &RetransmitEvent, names: &StateNames) -> RetransmitSignal {
    RetransmitSignal {
        ts_ns: rec.hdr.ts_ns,
        sk: rec.sk,
        flow: decode::flow_key(&rec.flow),
        state: state(names, rec.state),
        snd_una: rec.snd_una,
        netns: rec.netns,
        owner: owner(rec.has_owner, &rec.owner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formats() -> (Format, Format) {
        (
            Format::parse(
                include_str!("../../../tests/fixtures/inet_sock_set_state.format-6.18"),
                "s",
            ),
            Format::parse(
                include_str!("../../../tests/fixtures/tcp_retransmit_skb.format-6.18"),
                "r",
            ),
        )
    }

    /// Socket offsets from a recorded kernel's BTF (Debian 6.12; the formats are 6.18's,
    /// unchanged in these fields since).
    fn recorded_btf() -> KernelBtf {
        crate::collect::recorded::btf(crate::collect::recorded::DEBIAN_6_12)
    }

    #[test]
    fn layout_from_recorded_formats_and_btf() {
        let (s, r) = formats();
        let btf = recorded_btf();
        let mut l = resolve_socket(&btf).unwrap();
        let names = resolve_lifecycle(&mut l, &s).unwrap();
        assert_eq!(
            resolve_retransmit(&mut l, &r, &btf).unwrap(),
            RetransmitFamily::Record
        );
        assert_eq!(
            (l.st_skaddr, l.st_oldstate, l.st_newstate, l.st_protocol),
            (8, 16, 20, 30)
        );
        assert_eq!((l.st.sport, l.st.dport, l.st.family), (24, 26, 28));
        assert_eq!(
            (l.st.saddr, l.st.daddr, l.st.saddr_v6, l.st.daddr_v6),
            (32, 36, 40, 56)
        );
        assert_eq!((l.rt_skaddr, l.rt_state), (16, 24));
        assert_eq!((l.rt.sport, l.rt.saddr_v6), (28, 42));
        assert_eq!(l.sk_family, ABSENT, "the record has its family");
        assert_eq!((l.syn_sent, l.close), (2, 7));
        assert_eq!(names[&2], "SYN_SENT");
        assert_eq!(names[&1], "ESTABLISHED");
        assert!(l.sk_err != ABSENT && l.snd_una != ABSENT);
    }

    #[test]
    fn retransmits_are_optional() {
        let (s, _) = formats();
        let btf = recorded_btf();
        let mut l = resolve_socket(&btf).unwrap();
        resolve_lifecycle(&mut l, &s).unwrap();
        assert_eq!(l.rt_skaddr, ABSENT);
        assert_eq!(l.valid, 1);
    }
}
