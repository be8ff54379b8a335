//! One trait for every kernel signal, after retis's collectors: whether the running kernel can
//! give it (from the layouts [`super::resolve`] found), and how its programs attach. Each
//! signal's folder also holds its `decode` (kernel record -> typed signal); decoding is called
//! from the pipeline by record kind, so it is a function of the folder, not a trait method.
//!
//! `droptrace check` asks every collector [`Collector::can_run`] (and, with hook probing,
//! attaches each on a throwaway load); `droptrace run` attaches them all, in [`ALL`]'s order,
//! and skips an optional one that the kernel refuses, by name.
use super::{Resolved, conntrack, drops, tcp, tns};
use crate::collect::loader::{Tracer, TracerError};

/// A kernel signal's hooks. Implementations are unit structs listed in [`ALL`].
pub trait Collector: Sync {
    /// What `check` prints and what a skipped hook's warning names.
    fn name(&self) -> &'static str;
    /// The run's warning, before the reason, when this optional collector cannot run.
    fn skipped(&self) -> &'static str;
    /// Whether `can_run` cannot tell from BTF alone and `check --probe` must attach it on a
    /// throwaway load (lockdown refuses fentry, kernels without kprobes refuse kprobes).
    fn probe_needed(&self) -> bool {
        false
    }
    /// Whether droptrace cannot run without it.
    fn required(&self) -> bool {
        false
    }
    /// Whether this kernel can give the signal: what it gives, or why not.
    fn can_run(&self, r: &Resolved) -> Result<String, String>;
    /// Loads and attaches the collector's programs (only after `can_run` said yes): what was
    /// attached, or why the kernel refused (typed: a refusal for want of a privilege is an
    /// exit status of its own).
    fn attach(&self, r: &Resolved, tracer: &mut Tracer) -> Result<String, TracerError>;
}

/// Every collector, the required one first.
pub static ALL: [&dyn Collector; 5] = [
    &Drops,
    &OracleNet,
    &TcpLifecycle,
    &Retransmits,
    &ConntrackRemovals,
];

/// A classic tracepoint program, and what `run` logs of it.
fn tracepoint(
    t: &mut Tracer,
    prog: &'static str,
    category: &str,
    name: &str,
) -> Result<String, TracerError> {
    t.attach_tracepoint(prog, category, name)
        .map(|()| format!("tracepoint {category}:{name}"))
}

/// `skb:kfree_skb`: every freed packet with its drop reason (required).
pub struct Drops;

impl Collector for Drops {
    fn name(&self) -> &'static str {
        "tracepoint skb:kfree_skb"
    }
    fn skipped(&self) -> &'static str {
        "drops"
    }
    fn required(&self) -> bool {
        true
    }
    fn can_run(&self, r: &Resolved) -> Result<String, String> {
        // Resolving the sk_buff layout already required its record format.
        Ok(if r.drop_btf {
            "present (attached as a BTF tracepoint)".to_string()
        } else {
            "present".to_string()
        })
    }
    fn attach(&self, r: &Resolved, t: &mut Tracer) -> Result<String, TracerError> {
        // The BTF tracepoint where the kernel describes the hook (no trace record per drop),
        // else the classic one; a refusal of the first falls back to the second.
        if r.drop_btf {
            match t.attach_btf_tracepoint(drops::BTF_PROGRAM, drops::TRACEPOINT) {
                Ok(()) => return Ok(format!("BTF tracepoint {}", drops::TRACEPOINT)),
                Err(e) => tracing::debug!("{e}; classic tracepoint instead"),
            }
        }
        tracepoint(t, drops::PROGRAM, drops::CATEGORY, drops::TRACEPOINT)
    }
}

/// cgroup_skb ingress and egress on the cgroup v2 root: Oracle Net handshakes.
pub struct OracleNet;

impl Collector for OracleNet {
    fn name(&self) -> &'static str {
        "cgroup v2 root (Oracle Net)"
    }
    fn skipped(&self) -> &'static str {
        "Oracle TNS not followed"
    }
    fn can_run(&self, r: &Resolved) -> Result<String, String> {
        r.cgroup2_root
            .as_ref()
            .map(|root| format!("TNS handshakes on watched ports ({})", root.display()))
            .ok_or_else(|| "no cgroup v2 root mounted".to_string())
    }
    fn attach(&self, r: &Resolved, t: &mut Tracer) -> Result<String, TracerError> {
        let root = r
            .cgroup2_root
            .as_ref()
            .ok_or_else(|| TracerError::Unavailable("no cgroup v2 root mounted".to_string()))?;
        // Each direction on its own: another agent holding one hook exclusively must not cost
        // the other (on a node both ends of a connection are often local, and the egress
        // program alone still sees the listener's REDIRECT).
        let mut attached = Vec::new();
        let mut refused = None;
        for (prog, dir) in [
            (tns::INGRESS_PROGRAM, "ingress"),
            (tns::EGRESS_PROGRAM, "egress"),
        ] {
            match t.attach_cgroup_skb(prog, root, dir == "ingress") {
                Ok(()) => attached.push(dir),
                // The first refusal is the run's warning (or the error); a second is said here.
                Err(e) if refused.is_none() => refused = Some(e),
                Err(e) => tracing::warn!("{}: {e}", self.skipped()),
            }
        }
        match refused {
            Some(e) if attached.is_empty() => Err(e),
            Some(e) => {
                tracing::warn!("{}: {e}", self.skipped());
                Ok(format!(
                    "cgroup_skb {} only on {}",
                    attached[0],
                    root.display()
                ))
            }
            None => Ok(format!(
                "cgroup_skb ingress and egress on {}",
                root.display()
            )),
        }
    }
}

/// `sock:inet_sock_set_state`: connect attempts and their outcome.
pub struct TcpLifecycle;

impl Collector for TcpLifecycle {
    fn name(&self) -> &'static str {
        "tracepoint sock:inet_sock_set_state"
    }
    fn skipped(&self) -> &'static str {
        "TCP lifecycle not traced"
    }
    fn can_run(&self, r: &Resolved) -> Result<String, String> {
        r.lifecycle
            .clone()
            .map(|()| "connect attempts and their outcome".to_string())
    }
    fn attach(&self, _: &Resolved, t: &mut Tracer) -> Result<String, TracerError> {
        tracepoint(
            t,
            tcp::STATE_PROGRAM,
            tcp::STATE_CATEGORY,
            tcp::STATE_TRACEPOINT,
        )
    }
}

/// `tcp:tcp_retransmit_skb`: SYN and data retransmits.
pub struct Retransmits;

impl Collector for Retransmits {
    fn name(&self) -> &'static str {
        "tracepoint tcp:tcp_retransmit_skb"
    }
    fn skipped(&self) -> &'static str {
        "retransmits not traced"
    }
    fn can_run(&self, r: &Resolved) -> Result<String, String> {
        r.retransmit.clone().map(|f| match f {
            tcp::RetransmitFamily::Record => "SYN and data retransmits".to_string(),
            tcp::RetransmitFamily::Socket => "SYN and data retransmits (this kernel's record has \
                                              no family field: read from the socket)"
                .to_string(),
        })
    }
    fn attach(&self, _: &Resolved, t: &mut Tracer) -> Result<String, TracerError> {
        tracepoint(
            t,
            tcp::RETRANSMIT_PROGRAM,
            tcp::RETRANSMIT_CATEGORY,
            tcp::RETRANSMIT_TRACEPOINT,
        )
    }
}

/// `nf_ct_delete` by fentry or kprobe: unreplied conntrack entries that expire. Where the
/// kernel refuses both, the run loop reads ctnetlink DESTROY events instead
/// ([`conntrack::netlink`]).
pub struct ConntrackRemovals;

impl Collector for ConntrackRemovals {
    fn name(&self) -> &'static str {
        "conntrack removals"
    }
    fn skipped(&self) -> &'static str {
        "conntrack removals not traced"
    }
    fn can_run(&self, r: &Resolved) -> Result<String, String> {
        r.ct_delete.clone().map(conntrack::Removal::describe)
    }
    fn probe_needed(&self) -> bool {
        true
    }
    fn attach(&self, r: &Resolved, t: &mut Tracer) -> Result<String, TracerError> {
        let first = r.ct_delete.clone().map_err(TracerError::Unavailable)?;
        t.attach_ct_removal(first)
            .map(conntrack::Removal::describe)
            .map_err(|e| TracerError::Unavailable(format!("this kernel refuses it: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drop_collector_is_the_one_required_and_comes_first() {
        assert!(ALL[0].required());
        assert_eq!(ALL[0].name(), "tracepoint skb:kfree_skb");
        assert_eq!(ALL.iter().filter(|c| c.required()).count(), 1);
    }

    #[test]
    fn collector_names_are_unique() {
        let mut names: Vec<_> = ALL.iter().map(|c| c.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
    }
}
