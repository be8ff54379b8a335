//! Truth tables over namespaces x, y, z with pods a, b, c (the Kubernetes e2e netpol suite's
//! and cyclonus's world; see tests/common). Every expected table is written out by hand from
//! the networking.k8s.io/v1 semantics, never computed. Rows are sources, columns destinations;
//! `.` allowed, `X` denied. A pod reaching itself never leaves its network namespace, so the
//! diagonal is always allowed.
mod netpol_world;

use droptrace::enrich::model::Protocol::{Sctp, Tcp, Udp};
use netpol_world::{apply_json, assert_table, pod_ip, pod_json, world};
use serde_json::json;

const ALL_ALLOWED: &str = "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   .   .   .   .   .   .   .   .
    x/b  .   .   .   .   .   .   .   .   .
    x/c  .   .   .   .   .   .   .   .   .
    y/a  .   .   .   .   .   .   .   .   .
    y/b  .   .   .   .   .   .   .   .   .
    y/c  .   .   .   .   .   .   .   .   .
    z/a  .   .   .   .   .   .   .   .   .
    z/b  .   .   .   .   .   .   .   .   .
    z/c  .   .   .   .   .   .   .   .   .";

/// Only x/a isolated for ingress, nothing allowed in.
const X_A_INGRESS_DENIED: &str = "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   .   .   .   .   .   .   .   .
    x/b  X   .   .   .   .   .   .   .   .
    x/c  X   .   .   .   .   .   .   .   .
    y/a  X   .   .   .   .   .   .   .   .
    y/b  X   .   .   .   .   .   .   .   .
    y/c  X   .   .   .   .   .   .   .   .
    z/a  X   .   .   .   .   .   .   .   .
    z/b  X   .   .   .   .   .   .   .   .
    z/c  X   .   .   .   .   .   .   .   .";

#[test]
fn no_policies_allow_everything() {
    assert_table(&world(""), Tcp, 80, ALL_ALLOWED);
}

#[test]
fn default_deny_ingress_isolates_every_pod_of_the_namespace() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
",
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   X   X   .   .   .   .   .   .
    x/b  X   .   X   .   .   .   .   .   .
    x/c  X   X   .   .   .   .   .   .   .
    y/a  X   X   X   .   .   .   .   .   .
    y/b  X   X   X   .   .   .   .   .   .
    y/c  X   X   X   .   .   .   .   .   .
    z/a  X   X   X   .   .   .   .   .   .
    z/b  X   X   X   .   .   .   .   .   .
    z/c  X   X   X   .   .   .   .   .   .",
    );
}

#[test]
fn pod_selector_or_namespace_selector_is_not_and() {
    // Two list items: pods b of x, OR any pod of y.
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-b-or-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
    - namespaceSelector: {matchLabels: {ns: y}}
",
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   .   .   .   .   .   .   .   .
    x/b  .   .   .   .   .   .   .   .   .
    x/c  X   .   .   .   .   .   .   .   .
    y/a  .   .   .   .   .   .   .   .   .
    y/b  .   .   .   .   .   .   .   .   .
    y/c  .   .   .   .   .   .   .   .   .
    z/a  X   .   .   .   .   .   .   .   .
    z/b  X   .   .   .   .   .   .   .   .
    z/c  X   .   .   .   .   .   .   .   .",
    );
}

#[test]
fn pod_selector_and_namespace_selector_in_one_peer() {
    // One list item with both selectors: pods b of namespace y only.
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-y-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
      namespaceSelector: {matchLabels: {ns: y}}
",
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   .   .   .   .   .   .   .   .
    x/b  X   .   .   .   .   .   .   .   .
    x/c  X   .   .   .   .   .   .   .   .
    y/a  X   .   .   .   .   .   .   .   .
    y/b  .   .   .   .   .   .   .   .   .
    y/c  X   .   .   .   .   .   .   .   .
    z/a  X   .   .   .   .   .   .   .   .
    z/b  X   .   .   .   .   .   .   .   .
    z/c  X   .   .   .   .   .   .   .   .",
    );
}

#[test]
fn ingress_on_named_port() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-serve-80, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - port: serve-80-tcp
",
    );
    assert_table(&c, Tcp, 80, ALL_ALLOWED);
    assert_table(&c, Tcp, 81, X_A_INGRESS_DENIED);
}

#[test]
fn egress_on_named_port() {
    // Named egress ports resolve against each destination pod's containerPorts.
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: egress-serve-81, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - ports:
    - port: serve-81-tcp
",
    );
    assert_table(&c, Tcp, 81, ALL_ALLOWED);
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   X   X   X   X   X   X   X   X
    x/b  .   .   .   .   .   .   .   .   .
    x/c  .   .   .   .   .   .   .   .   .
    y/a  .   .   .   .   .   .   .   .   .
    y/b  .   .   .   .   .   .   .   .   .
    y/c  .   .   .   .   .   .   .   .   .
    z/a  .   .   .   .   .   .   .   .   .
    z/b  .   .   .   .   .   .   .   .   .
    z/c  .   .   .   .   .   .   .   .   .",
    );
}

#[test]
fn named_port_with_wrong_protocol_matches_nothing() {
    // serve-80-tcp is a TCP port: asked for as UDP it names nothing, for TCP or UDP.
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: udp-named-tcp, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - port: serve-80-tcp
      protocol: UDP
",
    );
    assert_table(&c, Tcp, 80, X_A_INGRESS_DENIED);
    assert_table(&c, Udp, 80, X_A_INGRESS_DENIED);
}

#[test]
fn named_port_not_served_matches_nothing() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: unknown-name, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - port: oracle-listener
",
    );
    assert_table(&c, Tcp, 80, X_A_INGRESS_DENIED);
    assert_table(&c, Tcp, 1521, X_A_INGRESS_DENIED);
}

#[test]
fn stacked_policies_with_overlapping_selectors_are_additive() {
    // Every pod of x admits x/b; x/a also admits all of y.
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: all-from-b, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {ns: y}}
",
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   X   X   .   .   .   .   .   .
    x/b  .   .   .   .   .   .   .   .   .
    x/c  X   X   .   .   .   .   .   .   .
    y/a  .   X   X   .   .   .   .   .   .
    y/b  .   X   X   .   .   .   .   .   .
    y/c  .   X   X   .   .   .   .   .   .
    z/a  X   X   X   .   .   .   .   .   .
    z/b  X   X   X   .   .   .   .   .   .
    z/c  X   X   X   .   .   .   .   .   .",
    );
}

#[test]
fn allow_all_takes_precedence_over_deny_all() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress:
  - {}
  egress:
  - {}
",
    );
    assert_table(&c, Tcp, 80, ALL_ALLOWED);
    assert_table(&c, Sctp, 81, ALL_ALLOWED);
}

#[test]
fn deny_egress_on_client_even_if_server_allows() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-no-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-all-in, namespace: y}
spec:
  podSelector: {}
  ingress:
  - {}
",
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   X   X   X   X   X   X   X   X
    x/b  .   .   .   .   .   .   .   .   .
    x/c  .   .   .   .   .   .   .   .   .
    y/a  .   .   .   .   .   .   .   .   .
    y/b  .   .   .   .   .   .   .   .   .
    y/c  .   .   .   .   .   .   .   .   .
    z/a  .   .   .   .   .   .   .   .   .
    z/b  .   .   .   .   .   .   .   .   .
    z/c  .   .   .   .   .   .   .   .   .",
    );
}

#[test]
fn deny_egress_on_reply_has_no_effect() {
    // x/a may open nothing, but connections others open to it are answered: replies are
    // not re-evaluated (the column of x/a stays allowed).
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-no-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress: []
",
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   X   X   X   X   X   X   X   X
    x/b  .   .   .   .   .   .   .   .   .
    x/c  .   .   .   .   .   .   .   .   .
    y/a  .   .   .   .   .   .   .   .   .
    y/b  .   .   .   .   .   .   .   .   .
    y/c  .   .   .   .   .   .   .   .   .
    z/a  .   .   .   .   .   .   .   .   .
    z/b  .   .   .   .   .   .   .   .   .
    z/c  .   .   .   .   .   .   .   .   .",
    );
}

#[test]
fn ip_block_with_except() {
    // 10.0.0.0/16 holds every pod; y's 10.0.2.0/24 is carved out.
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: cidr-except-y, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - ipBlock:
        cidr: 10.0.0.0/16
        except: [10.0.2.0/24]
",
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   .   .   .   .   .   .   .   .
    x/b  .   .   .   .   .   .   .   .   .
    x/c  .   .   .   .   .   .   .   .   .
    y/a  X   .   .   .   .   .   .   .   .
    y/b  X   .   .   .   .   .   .   .   .
    y/c  X   .   .   .   .   .   .   .   .
    z/a  .   .   .   .   .   .   .   .   .
    z/b  .   .   .   .   .   .   .   .   .
    z/c  .   .   .   .   .   .   .   .   .",
    );
}

#[test]
fn ip_in_both_cidr_and_except_is_denied() {
    // y/b (10.0.2.2) is inside the cidr and inside the except.
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: y-but-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.2/32]}
",
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   .   .   .   .   .   .   .   .
    x/b  X   .   .   .   .   .   .   .   .
    x/c  X   .   .   .   .   .   .   .   .
    y/a  .   .   .   .   .   .   .   .   .
    y/b  X   .   .   .   .   .   .   .   .
    y/c  .   .   .   .   .   .   .   .   .
    z/a  X   .   .   .   .   .   .   .   .
    z/b  X   .   .   .   .   .   .   .   .
    z/c  X   .   .   .   .   .   .   .   .",
    );
}

#[test]
fn egress_ip_block_matches_pod_ips() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-to-z-cidr, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 10.0.3.0/24}
",
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   X   X   X   X   X   .   .   .
    x/b  .   .   .   .   .   .   .   .   .
    x/c  .   .   .   .   .   .   .   .   .
    y/a  .   .   .   .   .   .   .   .   .
    y/b  .   .   .   .   .   .   .   .   .
    y/c  .   .   .   .   .   .   .   .   .
    z/a  .   .   .   .   .   .   .   .   .
    z/b  .   .   .   .   .   .   .   .   .
    z/c  .   .   .   .   .   .   .   .   .",
    );
}

#[test]
fn sctp_is_not_tcp() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: sctp-80, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - {protocol: SCTP, port: 80}
",
    );
    assert_table(&c, Sctp, 80, ALL_ALLOWED);
    assert_table(&c, Tcp, 80, X_A_INGRESS_DENIED);
    assert_table(&c, Udp, 80, X_A_INGRESS_DENIED);
}

#[test]
fn tcp_denied_when_only_udp_allowed() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: udp-80, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - {protocol: UDP, port: 80}
",
    );
    assert_table(&c, Udp, 80, ALL_ALLOWED);
    assert_table(&c, Tcp, 80, X_A_INGRESS_DENIED);
}

#[test]
fn any_port_rule_on_a_protocol() {
    // A port entry without port: every port of that protocol, and only that protocol.
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: any-udp, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - protocol: UDP
",
    );
    assert_table(&c, Udp, 81, ALL_ALLOWED);
    assert_table(&c, Udp, 5353, ALL_ALLOWED);
    assert_table(&c, Tcp, 81, X_A_INGRESS_DENIED);
}

#[test]
fn port_protocol_defaults_to_tcp() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: port-81, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - port: 81
",
    );
    assert_table(&c, Tcp, 81, ALL_ALLOWED);
    assert_table(&c, Udp, 81, X_A_INGRESS_DENIED);
    assert_table(&c, Tcp, 80, X_A_INGRESS_DENIED);
}

#[test]
fn end_port_range_is_inclusive() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: range, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports:
    - {port: 80, endPort: 81}
",
    );
    assert_table(&c, Tcp, 80, ALL_ALLOWED);
    assert_table(&c, Tcp, 81, ALL_ALLOWED);
    assert_table(&c, Tcp, 79, X_A_INGRESS_DENIED);
    assert_table(&c, Tcp, 82, X_A_INGRESS_DENIED);
}

#[test]
fn namespace_selected_by_default_metadata_name_label() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-z, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector:
        matchLabels: {kubernetes.io/metadata.name: z}
",
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   .   .   .   .   .   .   .   .
    x/b  X   .   .   .   .   .   .   .   .
    x/c  X   .   .   .   .   .   .   .   .
    y/a  X   .   .   .   .   .   .   .   .
    y/b  X   .   .   .   .   .   .   .   .
    y/c  X   .   .   .   .   .   .   .   .
    z/a  .   .   .   .   .   .   .   .   .
    z/b  .   .   .   .   .   .   .   .   .
    z/c  .   .   .   .   .   .   .   .   .",
    );
}

#[test]
fn empty_pod_selector_does_not_match_pods_in_another_namespace() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: same-ns-only, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from:
    - podSelector: {}
",
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   .   .   .   .   .   .   .   .
    x/b  .   .   .   .   .   .   .   .   .
    x/c  .   .   .   .   .   .   .   .   .
    y/a  X   X   X   .   .   .   .   .   .
    y/b  X   X   X   .   .   .   .   .   .
    y/c  X   X   X   .   .   .   .   .   .
    z/a  X   X   X   .   .   .   .   .   .
    z/b  X   X   X   .   .   .   .   .   .
    z/c  X   X   X   .   .   .   .   .   .",
    );
}

#[test]
fn empty_namespace_selector_matches_all_namespaces() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: any-ns, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from:
    - namespaceSelector: {}
",
    );
    assert_table(&c, Tcp, 80, ALL_ALLOWED);
}

#[test]
fn egress_section_without_policy_types_implies_egress_and_ingress() {
    // Raw YAML: policyTypes defaults to [Ingress, Egress] because egress rules exist. The
    // missing ingress section then admits nothing.
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-to-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  egress:
  - to:
    - podSelector: {matchLabels: {pod: b}}
",
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   .   X   X   X   X   X   X   X
    x/b  X   .   .   .   .   .   .   .   .
    x/c  X   .   .   .   .   .   .   .   .
    y/a  X   .   .   .   .   .   .   .   .
    y/b  X   .   .   .   .   .   .   .   .
    y/c  X   .   .   .   .   .   .   .   .
    z/a  X   .   .   .   .   .   .   .   .
    z/b  X   .   .   .   .   .   .   .   .
    z/c  X   .   .   .   .   .   .   .   .",
    );
}

#[test]
fn empty_egress_list_without_policy_types_is_ingress_only() {
    // The API server adds Egress only for a non-empty egress list.
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: empty-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  egress: []
",
    );
    assert_table(&c, Tcp, 80, X_A_INGRESS_DENIED);
}

#[test]
fn empty_rule_allows_every_peer_and_port() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-open, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - {}
",
    );
    assert_table(
        &c,
        Udp,
        81,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   X   X   .   .   .   .   .   .
    x/b  .   .   X   .   .   .   .   .   .
    x/c  .   X   .   .   .   .   .   .   .
    y/a  .   X   X   .   .   .   .   .   .
    y/b  .   X   X   .   .   .   .   .   .
    y/c  .   X   X   .   .   .   .   .   .
    z/a  .   X   X   .   .   .   .   .   .
    z/b  .   X   X   .   .   .   .   .   .
    z/c  .   X   X   .   .   .   .   .   .",
    );
}

#[test]
fn match_expressions_in_not_in_exists() {
    // From pods not labelled pod=b in namespaces x or y; and from any pod c anywhere.
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: exprs, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector:
        matchExpressions: [{key: pod, operator: NotIn, values: [b]}]
      namespaceSelector:
        matchExpressions: [{key: ns, operator: In, values: [x, y]}]
    - podSelector:
        matchExpressions: [{key: pod, operator: In, values: [c]}]
      namespaceSelector:
        matchExpressions: [{key: ns, operator: Exists}]
",
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   .   .   .   .   .   .   .   .
    x/b  X   .   .   .   .   .   .   .   .
    x/c  .   .   .   .   .   .   .   .   .
    y/a  .   .   .   .   .   .   .   .   .
    y/b  X   .   .   .   .   .   .   .   .
    y/c  .   .   .   .   .   .   .   .   .
    z/a  X   .   .   .   .   .   .   .   .
    z/b  X   .   .   .   .   .   .   .   .
    z/c  .   .   .   .   .   .   .   .   .",
    );
}

#[test]
fn match_expressions_does_not_exist() {
    // Pods without a `pod` label: none here, so x/a admits nobody.
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: unlabelled-only, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector:
        matchExpressions: [{key: pod, operator: DoesNotExist}]
      namespaceSelector: {}
",
    );
    assert_table(&c, Tcp, 80, X_A_INGRESS_DENIED);
}

#[test]
fn policy_applies_after_pod_label_update_and_stops_after_another() {
    let mut c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: quarantine, namespace: x}
spec:
  podSelector: {matchLabels: {quarantine: 'true'}}
  policyTypes: [Ingress]
",
    );
    assert_table(&c, Tcp, 80, ALL_ALLOWED);
    apply_json(
        &mut c,
        pod_json("x/b", json!({"pod": "b", "quarantine": "true"})),
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   X   .   .   .   .   .   .   .
    x/b  .   .   .   .   .   .   .   .   .
    x/c  .   X   .   .   .   .   .   .   .
    y/a  .   X   .   .   .   .   .   .   .
    y/b  .   X   .   .   .   .   .   .   .
    y/c  .   X   .   .   .   .   .   .   .
    z/a  .   X   .   .   .   .   .   .   .
    z/b  .   X   .   .   .   .   .   .   .
    z/c  .   X   .   .   .   .   .   .   .",
    );
    apply_json(&mut c, pod_json("x/b", json!({"pod": "b"})));
    assert_table(&c, Tcp, 80, ALL_ALLOWED);
}

#[test]
fn policy_applies_after_namespace_label_update_and_stops_after_another() {
    let mut c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: from-blue, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {team: blue}}
",
    );
    assert_table(&c, Tcp, 80, X_A_INGRESS_DENIED);
    apply_json(
        &mut c,
        netpol_world::namespace_json("y", json!({"ns": "y", "team": "blue"})),
    );
    assert_table(
        &c,
        Tcp,
        80,
        "
        x/a x/b x/c y/a y/b y/c z/a z/b z/c
    x/a  .   .   .   .   .   .   .   .   .
    x/b  X   .   .   .   .   .   .   .   .
    x/c  X   .   .   .   .   .   .   .   .
    y/a  .   .   .   .   .   .   .   .   .
    y/b  .   .   .   .   .   .   .   .   .
    y/c  .   .   .   .   .   .   .   .   .
    z/a  X   .   .   .   .   .   .   .   .
    z/b  X   .   .   .   .   .   .   .   .
    z/c  X   .   .   .   .   .   .   .   .",
    );
    apply_json(
        &mut c,
        netpol_world::namespace_json("y", json!({"ns": "y"})),
    );
    assert_table(&c, Tcp, 80, X_A_INGRESS_DENIED);
}

#[test]
fn policy_stops_applying_when_deleted() {
    use droptrace::enrich::{
        k8s::{ObjectKind, ObjectRef},
        model::{ObjectKey, now},
    };
    let mut c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
",
    );
    assert_table(&c, Tcp, 80, X_A_INGRESS_DENIED);
    c.delete(
        &ObjectRef {
            kind: ObjectKind::NetworkPolicy,
            key: ObjectKey::new("x", "deny-a"),
        },
        now(),
    );
    assert_table(&c, Tcp, 80, ALL_ALLOWED);
}

// ------------------------------------------------------------- fixes that prove themselves

/// x/a may open nothing.
const A_NO_EGRESS: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-no-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
";

fn fix_check_of(
    c: &droptrace::enrich::k8s::Cluster,
    from: &str,
    to: &str,
    port: u16,
) -> (String, droptrace::event::FixCheck) {
    let r = droptrace::enrich::k8s::evaluate_flow(
        c,
        &netpol_world::query(pod_ip(from), pod_ip(to), Tcp, port),
        &[],
    );
    assert!(
        !r.verdict.allowed(),
        "{from} -> {to} must be denied to have a fix"
    );
    let fix = r.policy.suggested_fix.clone().expect("a suggested fix");
    (fix, r.policy.fix_check.clone().expect("a fix check"))
}

fn admitted(list: &[droptrace::event::Admitted]) -> Vec<String> {
    list.iter()
        .map(|a| format!("{} -> {} {}/{}", a.from, a.to, a.protocol, a.port))
        .collect()
}

/// The fix for one denied egress selects that pod and that peer on that port: nothing else.
#[test]
fn narrow_fix_allows_the_flow_and_nothing_else() {
    let c = world(A_NO_EGRESS);
    let (fix, check) = fix_check_of(&c, "x/a", "y/b", 80);
    assert!(fix.contains("pod: a") && fix.contains("pod: b"), "{fix}");
    assert!(check.allows_flow);
    assert_eq!(admitted(&check.newly_allowed), Vec::<String>::new());
    assert!(!check.truncated);
}

/// Both directions denied: two policies, and together they let the flow through.
#[test]
fn fix_for_both_directions_allows_the_flow() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-no-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-in, namespace: y}
spec:
  podSelector: {}
",
    );
    let (fix, check) = fix_check_of(&c, "x/a", "y/b", 80);
    assert_eq!(fix.matches("kind: NetworkPolicy").count(), 2, "{fix}");
    assert!(check.allows_flow);
    assert!(
        check.newly_allowed.is_empty(),
        "{:?}",
        admitted(&check.newly_allowed)
    );
}

/// Replicas share their workload label: the fix selects every replica on both sides, so it
/// also admits the other replica's connections. The check lists each of them.
#[test]
fn fix_broader_than_the_flow_lists_what_else_it_admits() {
    let mut c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
",
    );
    for (pod, app) in [("x/a", "web"), ("x/b", "web"), ("y/b", "db"), ("y/c", "db")] {
        let name = pod.split_once('/').unwrap().1;
        apply_json(&mut c, pod_json(pod, json!({"pod": name, "app": app})));
    }
    let (fix, check) = fix_check_of(&c, "x/a", "y/b", 80);
    assert!(fix.contains("app: web") && fix.contains("app: db"), "{fix}");
    assert!(check.allows_flow);
    assert_eq!(
        admitted(&check.newly_allowed),
        [
            "x/a -> y/c TCP/80",
            "x/b -> y/b TCP/80",
            "x/b -> y/c TCP/80",
        ]
    );
    // Brute force agrees: every pod pair on every port the pods serve, with the whole policy
    // set copied and the fix added.
    let mut after = c.policies().clone();
    for p in droptrace::enrich::k8s::fix_check::parse_fix(&fix).unwrap() {
        after.insert(p);
    }
    let mut brute = Vec::new();
    for from in netpol_world::PODS {
        for to in netpol_world::PODS {
            for port in [80, 81] {
                let (a, b) = (c.side(pod_ip(from), None), c.side(pod_ip(to), None));
                let newly = !c.policies().evaluate(&a, &b, Tcp, port).allowed()
                    && after.evaluate(&a, &b, Tcp, port).allowed();
                if newly && !(from == "x/a" && to == "y/b" && port == 80) {
                    brute.push(format!("{from} -> {to} TCP/{port}"));
                }
            }
        }
    }
    assert_eq!(admitted(&check.newly_allowed), brute);
}

/// A hand-written fix with a port range: every port of the range but the flow's is listed,
/// and a fix that misses the flow says so.
#[test]
fn fix_check_of_a_port_range_and_of_a_fix_that_misses() {
    use droptrace::enrich::k8s::fix_check;
    let c = world(A_NO_EGRESS);
    let (src, dst) = (c.side(pod_ip("x/a"), None), c.side(pod_ip("y/b"), None));
    let range = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-range, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - namespaceSelector: {matchLabels: {ns: y}}
      podSelector: {matchLabels: {pod: b}}
    ports:
    - {protocol: TCP, port: 80, endPort: 82}
";
    let check = fix_check::check(&c, &src, &dst, Tcp, &[80], range).unwrap();
    assert!(check.allows_flow);
    assert_eq!(
        admitted(&check.newly_allowed),
        ["x/a -> y/b TCP/81", "x/a -> y/b TCP/82"]
    );
    let wrong_port = range.replace("port: 80, endPort: 82", "port: 443");
    let check = fix_check::check(&c, &src, &dst, Tcp, &[80], &wrong_port).unwrap();
    assert!(
        !check.allows_flow,
        "a fix on another port does not fix the flow"
    );
    assert_eq!(admitted(&check.newly_allowed), ["x/a -> y/b TCP/443"]);
    assert!(fix_check::check(&c, &src, &dst, Tcp, &[80], "kind: [").is_none());
}
