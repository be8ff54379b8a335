//! Oracle Net conversations: reassembles the captured TNS packets of each connection, emits
//! `tns` events, and tells the correlator what the listener said (a REDIRECT to another
//! address, a REFUSE) so the blocked second leg is tied to the listener connect.
use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::{IpAddr, SocketAddr},
};

use crate::{
    collect::tns::TnsSignal,
    decode::FlowKey,
    decode::oracle::{ConnectInfo, Direction, Message, Segment, TnsStream},
    event,
};

/// A packet's identity at one end: (that end, toward the server, seq, payload length). The
/// same packet seen leaving one local socket and arriving at another keeps its sequence
/// number and length whatever NAT did to the addresses, and at least one end unchanged.
type SeenKey = (SocketAddr, bool, u32, u32);

/// Connections followed at once; the oldest is dropped beyond it.
const MAX_CONNECTIONS: usize = 4096;
/// Packets remembered to drop the copy seen on the other end of a local connection.
const DEDUP: usize = 4096;
/// Listeners whose redirect ports are remembered; the one redirecting least recently is
/// forgotten beyond it.
const MAX_REDIRECTING: usize = 1024;
/// Redirect ports remembered per listener and host; the least recently used is forgotten.
const MAX_REDIRECT_PORTS: usize = 64;
/// A redirect port not used again for this long is forgotten (a dispatcher restarted on
/// another port, say).
pub const REDIRECT_PORTS_NS: u64 = 3_600_000_000_000;

/// The ports one listener redirected clients to on one host, with when each was last used.
type RedirectPorts = BTreeMap<u16, u64>;

/// What the listener told a client.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Go to `host:port` instead (`target` when host is an address).
    Redirect {
        client: IpAddr,
        listener: SocketAddr,
        host: String,
        port: u16,
        target: Option<SocketAddr>,
        oracle: event::Oracle,
    },
    /// No, with an ORA error code.
    Refuse {
        /// Client -> listener.
        flow: FlowKey,
        oracle: event::Oracle,
        code: Option<u32>,
        text: String,
    },
}

pub struct Tracked {
    /// `tns` events to emit.
    pub events: Vec<(FlowKey, event::Oracle)>,
    pub outcomes: Vec<Outcome>,
}

struct Conn {
    stream: TnsStream,
    connect: Option<ConnectInfo>,
}

pub struct TnsTracker {
    /// Ports listeners answer on (the watched ports) and learned redirect targets.
    listener_ports: HashSet<u16>,
    targets: HashSet<SocketAddr>,
    /// Ports of redirect targets named by host name (watched on every address).
    target_ports: HashSet<u16>,
    conns: HashMap<(SocketAddr, SocketAddr), Conn>,
    order: VecDeque<(SocketAddr, SocketAddr)>,
    /// The conversation of each client endpoint: behind a Service the client's copy of a
    /// packet names the Service address, the listener's copy the pod; both are one
    /// conversation, named as the client dialled it.
    by_client: HashMap<SocketAddr, SocketAddr>,
    seen: HashSet<SeenKey>,
    seen_order: VecDeque<SeenKey>,
    /// Where each listener (as the client dialled it) sent clients, by target host: more than
    /// one port means the listener hands out dynamic ports.
    redirect_ports: HashMap<(SocketAddr, String), RedirectPorts>,
    /// Bytes the parser could not decode, reported as lost input.
    pub malformed: u64,
}

impl TnsTracker {
    pub fn new(listener_ports: impl IntoIterator<Item = u16>) -> Self {
        Self {
            listener_ports: listener_ports.into_iter().collect(),
            targets: HashSet::new(),
            target_ports: HashSet::new(),
            conns: HashMap::new(),
            order: VecDeque::new(),
            by_client: HashMap::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            redirect_ports: HashMap::new(),
            malformed: 0,
        }
    }

    /// A redirect target: connections to it are second legs (the client speaks first).
    pub fn learn_target(&mut self, target: SocketAddr) {
        self.targets.insert(target);
    }

    /// A redirect target named by host name: its port, on any address.
    pub fn learn_target_port(&mut self, port: u16) {
        self.target_ports.insert(port);
    }

    /// Whether a listener redirected some client to `end` (by address, or by port for a
    /// target named by host name).
    pub fn is_redirect_target(&self, end: SocketAddr) -> bool {
        self.targets.contains(&end) || self.target_ports.contains(&end.port())
    }

    fn is_server(&self, end: SocketAddr) -> bool {
        self.targets.contains(&end) || self.listener_ports.contains(&end.port())
    }

    pub fn on_packet(&mut self, p: &TnsSignal) -> Tracked {
        let mut out = Tracked {
            events: Vec::new(),
            outcomes: Vec::new(),
        };
        let (dir, client, server) = if self.is_server(p.flow.dst)
            || !self.is_server(p.flow.src) && p.flow.dst.port() < p.flow.src.port()
        {
            (Direction::ToServer, p.flow.src, p.flow.dst)
        } else {
            (Direction::ToClient, p.flow.dst, p.flow.src)
        };
        // The same packet leaves one local socket and arrives at another: keep one copy,
        // also when a Service DNAT (or an SNAT) rewrote one end in between.
        let up = dir == Direction::ToServer;
        let ids = [
            (client, up, p.seq, p.payload_len),
            (server, up, p.seq, p.payload_len),
        ];
        if ids.iter().any(|id| self.seen.contains(id)) {
            return out;
        }
        for id in ids {
            self.seen.insert(id);
            self.seen_order.push_back(id);
        }
        while self.seen_order.len() > DEDUP {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }

        // One conversation per client endpoint, named by the first copy seen (the client's
        // own, when the client is on this node: it sends the CONNECT).
        let server = match self.by_client.get(&client) {
            Some(s) if self.conns.contains_key(&(client, *s)) => *s,
            _ => server,
        };
        let key = (client, server);
        if !self.conns.contains_key(&key) {
            if self.conns.len() >= MAX_CONNECTIONS
                && let Some(old) = self.order.pop_front()
            {
                self.conns.remove(&old);
                if self.by_client.get(&old.0) == Some(&old.1) {
                    self.by_client.remove(&old.0);
                }
            }
            self.by_client.insert(client, server);
            self.order.push_back(key);
            self.conns.insert(
                key,
                Conn {
                    stream: TnsStream::new(),
                    connect: None,
                },
            );
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return out;
        };
        let seg = Segment::truncated(&p.data, p.payload_len as usize).with_seq(p.seq);
        let flow = FlowKey {
            src: client,
            dst: server,
        };
        for msg in conn.stream.feed(dir, seg) {
            let Some(mut oracle) = msg.to_oracle() else {
                self.malformed += 1;
                continue;
            };
            oracle.listener = Some(event::Listener {
                ip: server.ip(),
                port: server.port(),
            });
            // Later packets carry no connect data: repeat the client's identity on them.
            if let Some(c) = &conn.connect {
                oracle.service_name = oracle.service_name.or_else(|| c.service_name.clone());
                oracle.sid = oracle.sid.or_else(|| c.sid.clone());
                oracle.program = oracle.program.or_else(|| c.program.clone());
                oracle.client_host = oracle.client_host.or_else(|| c.client_host.clone());
                oracle.client_user = oracle.client_user.or_else(|| c.client_user.clone());
            }
            match &msg {
                Message::Connect(c) => conn.connect = Some(c.clone()),
                Message::Redirect(r) => {
                    if let (Some(host), Some(port)) = (r.host.clone(), r.port) {
                        let ports =
                            record_redirect(&mut self.redirect_ports, server, &host, port, p.ts_ns);
                        if ports.len() > 1 {
                            oracle.remedy = Some(dynamic_port_remedy(server, &host, &ports));
                            oracle.redirect_ports = ports;
                        }
                        let target = host
                            .parse::<IpAddr>()
                            .ok()
                            .map(|ip| SocketAddr::new(ip, port));
                        out.outcomes.push(Outcome::Redirect {
                            client: client.ip(),
                            listener: server,
                            host,
                            port,
                            target,
                            oracle: oracle.clone(),
                        });
                    }
                }
                Message::Refuse(r) => out.outcomes.push(Outcome::Refuse {
                    flow,
                    oracle: oracle.clone(),
                    code: r.code,
                    text: r.text.clone(),
                }),
                _ => {}
            }
            out.events.push((flow, oracle));
        }
        out
    }
}

/// Records that `listener` sent a client to `host:port` at `ts_ns`; returns every port it
/// sent clients to on `host` within [`REDIRECT_PORTS_NS`], ascending.
fn record_redirect(
    all: &mut HashMap<(SocketAddr, String), RedirectPorts>,
    listener: SocketAddr,
    host: &str,
    port: u16,
    ts_ns: u64,
) -> Vec<u16> {
    let key = (listener, host.to_string());
    {
        if !all.contains_key(&key) && all.len() >= MAX_REDIRECTING {
            let stalest = all
                .iter()
                .min_by_key(|(_, ports)| ports.values().max().copied().unwrap_or(0))
                .map(|(k, _)| k.clone());
            if let Some(k) = stalest {
                all.remove(&k);
            }
        }
        let ports = all.entry(key).or_default();
        ports.retain(|_, last| ts_ns.saturating_sub(*last) < REDIRECT_PORTS_NS);
        ports.insert(port, ts_ns);
        while ports.len() > MAX_REDIRECT_PORTS {
            let oldest = ports.iter().min_by_key(|(_, t)| **t).map(|(p, _)| *p);
            match oldest {
                Some(p) => ports.remove(&p),
                None => break,
            };
        }
        ports.keys().copied().collect()
    }
}

/// The Oracle-side remedy for a listener that hands out dynamic ports, after Oracle's
/// documentation: USE_SHARED_SOCKET (Oracle Database Platform Guide for Windows, "About
/// USE_SHARED_SOCKET Parameter") and DISPATCHERS (Oracle Database Reference, "DISPATCHERS").
pub fn dynamic_port_remedy(listener: SocketAddr, host: &str, ports: &[u16]) -> String {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        "listener {listener} redirected clients to {} different ports on {host} ({}): the \
         database is reached on ports it picks, which a policy can only cover as a range. \
         Windows, dedicated servers: set USE_SHARED_SOCKET=TRUE (registry key of the Oracle \
         home, or environment) and restart the listener; it then hands each client's socket \
         to the database thread and every connection shares the listener's port. Shared \
         server: give each dispatcher a fixed port in the DISPATCHERS initialization \
         parameter, e.g. DISPATCHERS=\"(ADDRESS=(PROTOCOL=TCP)(PORT={}))\", so the ports the \
         policy names stay the same across restarts.",
        ports.len(),
        list.join(", "),
        ports.first().copied().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::oracle::tns::build;

    fn sig(src: &str, dst: &str, seq: u32, data: &[u8]) -> TnsSignal {
        TnsSignal {
            ts_ns: 1,
            flow: FlowKey {
                src: src.parse().unwrap(),
                dst: dst.parse().unwrap(),
            },
            seq,
            payload_len: data.len() as u32,
            data: data.to_vec(),
        }
    }

    #[test]
    fn redirect_in_the_split_form_names_the_second_leg() {
        let mut t = TnsTracker::new([1521]);
        let connect = include_bytes!("../../tests/fixtures/tns/python-oracledb-26.1.0-connect.bin");
        let c = t.on_packet(&sig("10.0.0.1:40000", "10.0.0.2:1521", 1, connect));
        assert_eq!(c.events.len(), 1, "{:?}", c.events);
        assert_eq!(c.events[0].1.packet.as_deref(), Some("CONNECT"));
        let redirect = build::redirect_split(
            b"(ADDRESS=(PROTOCOL=TCP)(HOST=10.0.0.9)(PORT=40123))\0(DESCRIPTION=)",
        );
        let r = t.on_packet(&sig("10.0.0.2:1521", "10.0.0.1:40000", 7, &redirect));
        let Some(Outcome::Redirect {
            client,
            listener,
            target,
            oracle,
            ..
        }) = r.outcomes.first()
        else {
            panic!("{:?}", r.outcomes)
        };
        assert_eq!(client.to_string(), "10.0.0.1");
        assert_eq!(listener.to_string(), "10.0.0.2:1521");
        assert_eq!(target.unwrap().to_string(), "10.0.0.9:40123");
        assert_eq!(oracle.program.as_deref(), Some("sqlplus"));
        // The same packets seen again (other end of a local connection): ignored.
        assert!(
            t.on_packet(&sig("10.0.0.2:1521", "10.0.0.1:40000", 7, &redirect))
                .events
                .is_empty()
        );
    }

    /// Client and listener on one node, a Service between them: every packet is seen twice,
    /// once naming the Service address (the client's socket) and once the pod (the
    /// listener's). One conversation, named as the client dialled it.
    #[test]
    fn redirect_behind_a_service_is_one_conversation_named_by_the_service() {
        let mut t = TnsTracker::new([1521]);
        let connect = include_bytes!("../../tests/fixtures/tns/python-oracledb-26.1.0-connect.bin");
        let client = "10.202.1.1:40000";
        let (svc, pod) = ("10.204.1.10:1521", "10.203.1.2:1521");
        // CONNECT leaves the client first, then arrives at the listener (after DNAT).
        let a = t.on_packet(&sig(client, svc, 1, connect));
        let b = t.on_packet(&sig(client, pod, 1, connect));
        assert_eq!(a.events.len() + b.events.len(), 1, "one CONNECT");
        // REDIRECT leaves the listener first (pod address), then reaches the client.
        let redirect = build::redirect_split(
            b"(ADDRESS=(PROTOCOL=TCP)(HOST=10.203.1.2)(PORT=40123))\0(DESCRIPTION=)",
        );
        let r1 = t.on_packet(&sig(pod, client, 9, &redirect));
        let r2 = t.on_packet(&sig(svc, client, 9, &redirect));
        let outcomes: Vec<_> = r1.outcomes.iter().chain(&r2.outcomes).collect();
        assert_eq!(outcomes.len(), 1, "{outcomes:?}");
        let Outcome::Redirect {
            listener, oracle, ..
        } = outcomes[0]
        else {
            panic!("{outcomes:?}")
        };
        assert_eq!(listener.to_string(), svc);
        assert_eq!(
            oracle.program.as_deref(),
            Some("sqlplus"),
            "CONNECT context kept"
        );
    }

    /// A Windows listener without USE_SHARED_SOCKET: each session goes to another port. The
    /// ports are remembered per listener and host, ascending, and forgotten an hour after
    /// their last use; one port is no dynamic listener.
    #[test]
    fn redirect_ports_accumulate_per_listener_and_age_out() {
        let mut t = TnsTracker::new([1521]);
        let redirect = |t: &mut TnsTracker, client: &str, port: u16, seq: u32, ts: u64| {
            let data =
                format!("(ADDRESS=(PROTOCOL=TCP)(HOST=10.0.0.2)(PORT={port}))\0(DESCRIPTION=)");
            let mut s = sig(
                "10.0.0.2:1521",
                client,
                seq,
                &build::redirect_split(data.as_bytes()),
            );
            s.ts_ns = ts;
            match t.on_packet(&s).outcomes.pop() {
                Some(Outcome::Redirect { oracle, .. }) => oracle,
                other => panic!("{other:?}"),
            }
        };
        let hour = REDIRECT_PORTS_NS;
        let o = redirect(&mut t, "10.0.0.1:40000", 40311, 1, 0);
        assert!(o.redirect_ports.is_empty() && o.remedy.is_none(), "{o:?}");
        let o = redirect(&mut t, "10.0.0.1:40001", 40123, 2, 1);
        assert_eq!(o.redirect_ports, [40123, 40311]);
        assert!(o.remedy.as_deref().unwrap().contains("(40123, 40311)"));
        // The same port again adds nothing.
        let o = redirect(&mut t, "10.0.0.1:40002", 40123, 3, 2);
        assert_eq!(o.redirect_ports, [40123, 40311]);
        // Another client of the same listener: the same listener's ports.
        let o = redirect(&mut t, "10.0.0.5:40000", 40200, 4, 3);
        assert_eq!(o.redirect_ports, [40123, 40200, 40311]);
        // An hour after 40311's last use (and just under one after the others'), it is gone.
        let o = redirect(&mut t, "10.0.0.1:40003", 40200, 5, hour);
        assert_eq!(o.redirect_ports, [40123, 40200]);
        let o = redirect(&mut t, "10.0.0.1:40004", 40200, 6, 3 * hour);
        assert!(o.redirect_ports.is_empty(), "{o:?}");
    }

    #[test]
    fn refuse_is_reported_with_its_code() {
        let mut t = TnsTracker::new([1521]);
        let refuse = build::refuse(
            b"(DESCRIPTION=(ERR=12514)(VSNNUM=0)(ERROR_STACK=(ERROR=(CODE=12514)(EMFI=4))))",
        );
        let r = t.on_packet(&sig("10.0.0.2:1521", "10.0.0.1:40000", 3, &refuse));
        let Some(Outcome::Refuse { code, flow, .. }) = r.outcomes.first() else {
            panic!("{:?}", r.outcomes)
        };
        assert_eq!(*code, Some(12514));
        assert_eq!(flow.dst.port(), 1521);
    }
}
