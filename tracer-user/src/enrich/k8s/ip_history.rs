//! Which pod held an address when: pod IPs are reused, and a drop reported late must be
//! attributed to the pod that had the address at the time, not to the one that has it now.
use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::enrich::model::{ObjectKey, Pod};

/// Clock skew tolerated between the API server (creation times) and the node (event times).
const GRACE: SignedDuration = SignedDuration::from_secs(5);

#[derive(Debug, Clone)]
struct Tenancy {
    pod: Arc<Pod>,
    /// None: since before anything we know of.
    from: Option<Timestamp>,
    /// None: still holds it.
    until: Option<Timestamp>,
}

impl Tenancy {
    fn covers(&self, t: Timestamp) -> bool {
        self.from.is_none_or(|f| f <= t) && self.until.is_none_or(|u| t < u)
    }

    /// How far `t` is outside this tenancy (zero inside).
    fn distance(&self, t: Timestamp) -> SignedDuration {
        if let Some(f) = self.from
            && t < f
        {
            return f.duration_since(t);
        }
        if let Some(u) = self.until
            && t >= u
        {
            return t.duration_since(u);
        }
        SignedDuration::ZERO
    }

    fn close(&mut self, at: Timestamp) {
        self.until = Some(self.from.map_or(at, |f| f.max(at)));
    }
}

fn same_pod(a: &Pod, b: &Pod) -> bool {
    match (&a.uid, &b.uid) {
        (Some(x), Some(y)) => x == y,
        _ => a.namespace == b.namespace && a.name == b.name,
    }
}

#[derive(Debug, Clone)]
pub struct IpHistory {
    by_ip: HashMap<IpAddr, Vec<Tenancy>>,
    /// The addresses each live pod holds, to release them on delete or change.
    held: HashMap<ObjectKey, Vec<IpAddr>>,
    retention: SignedDuration,
    /// Pruning walks every address: do it at most this often, not on every update.
    prune_every: SignedDuration,
    last_prune: Option<Timestamp>,
}

impl IpHistory {
    pub fn new(retention: Duration) -> Self {
        let retention = SignedDuration::try_from(retention).unwrap_or(SignedDuration::MAX);
        Self {
            by_ip: HashMap::new(),
            held: HashMap::new(),
            retention,
            prune_every: (retention / 10).min(SignedDuration::from_secs(60)),
            last_prune: None,
        }
    }

    /// Record `pod` (new or updated) as the holder of its addresses, observed at `now`.
    /// hostNetwork pods hold node addresses, shared by many: they are never recorded.
    pub fn hold(&mut self, pod: &Arc<Pod>, now: Timestamp) {
        let key = pod.key();
        let ips: &[IpAddr] = if pod.host_network { &[] } else { &pod.ips };
        if let Some(previous) = self.held.get(&key).cloned() {
            for ip in previous.iter().filter(|ip| !ips.contains(ip)) {
                self.close(*ip, &key, now);
            }
        }
        for ip in ips {
            let list = self.by_ip.entry(*ip).or_default();
            if let Some(t) = list
                .iter_mut()
                .find(|t| t.until.is_none() && same_pod(&t.pod, pod))
            {
                t.pod = Arc::clone(pod);
                continue;
            }
            let mut until = None;
            for other in list.iter_mut().filter(|t| t.until.is_none()) {
                match (pod.created, other.from) {
                    // Seen out of order: the other pod took the address after this one.
                    (Some(mine), Some(theirs)) if mine < theirs => until = Some(theirs),
                    (mine, _) => other.close(mine.unwrap_or(now)),
                }
            }
            list.push(Tenancy {
                pod: Arc::clone(pod),
                from: pod.created,
                until,
            });
        }
        if ips.is_empty() {
            self.held.remove(&key);
        } else {
            self.held.insert(key, ips.to_vec());
        }
        self.maybe_prune(now);
    }

    /// The pod is gone (deleted, or no longer in the snapshot) as of `at`.
    pub fn release(&mut self, key: &ObjectKey, at: Timestamp) {
        for ip in self.held.remove(key).unwrap_or_default() {
            self.close(ip, key, at);
        }
        self.maybe_prune(at);
    }

    fn close(&mut self, ip: IpAddr, key: &ObjectKey, at: Timestamp) {
        for t in self.by_ip.get_mut(&ip).into_iter().flatten() {
            if t.until.is_none() && t.pod.namespace == key.namespace && t.pod.name == key.name {
                t.close(at);
            }
        }
    }

    /// The pod that held `ip` at `at`; with no time, the current holder or else the last one.
    pub fn lookup(&self, ip: IpAddr, at: Option<Timestamp>) -> Option<&Arc<Pod>> {
        let list = self.by_ip.get(&ip.to_canonical())?;
        let Some(t) = at else {
            return list
                .iter()
                .rev()
                .find(|t| t.until.is_none())
                .or_else(|| list.iter().max_by_key(|t| t.until))
                .map(|t| &t.pod);
        };
        if let Some(hit) = list.iter().rev().find(|x| x.covers(t)) {
            return Some(&hit.pod);
        }
        list.iter()
            .map(|x| (x.distance(t), x))
            .filter(|(d, _)| *d <= GRACE)
            .min_by_key(|(d, _)| *d)
            .map(|(_, x)| &x.pod)
    }

    fn maybe_prune(&mut self, now: Timestamp) {
        let due = self
            .last_prune
            .is_none_or(|last| now.duration_since(last) >= self.prune_every);
        if due {
            self.prune(now);
        }
    }

    /// Forget tenancies that ended longer than the retention ago.
    pub fn prune(&mut self, now: Timestamp) {
        self.last_prune = Some(now);
        let Ok(horizon) = now.checked_sub(self.retention) else {
            return;
        };
        self.by_ip.retain(|_, list| {
            list.retain(|t| t.until.is_none_or(|u| u >= horizon));
            !list.is_empty()
        });
    }

    /// Number of (address, pod) records kept, current and past.
    pub fn len(&self) -> usize {
        self.by_ip.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ip.is_empty()
    }
}
