#!/usr/bin/env python3
"""Writes the JSON Schemas under schema/ (run from anywhere: python3 schema/generate.py).

One source for the droptrace.v1 definitions (mirroring tracer-user/src/event.rs field by
field), reused by the ECS and OCSF schemas for their `droptrace` vendor / `unmapped`
sections. Every file is self-contained (no cross-file $ref), draft 2020-12. The golden test
(tracer-user/tests/formats.rs) validates every encoded sample against these files.
"""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
D = "https://json-schema.org/draft/2020-12/schema"
ID = "https://droptrace.dev/schema/"

U16 = {"type": "integer", "minimum": 0, "maximum": 65535}
U32 = {"type": "integer", "minimum": 0, "maximum": 4294967295}
U64 = {"type": "integer", "minimum": 0}
STR = {"type": "string"}
TIME = {"type": "string", "format": "date-time",
        "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"}
IP = {"type": "string", "anyOf": [{"format": "ipv4"}, {"format": "ipv6"}]}
FLAG = "(FIN|SYN|RST|PSH|ACK|URG|ECE|CWR)"


def obj(required, optional=None, extra=False, desc=None):
    props = dict(required)
    props.update(optional or {})
    o = {"type": "object", "properties": props, "required": sorted(required),
         "additionalProperties": extra}
    if desc:
        o["description"] = desc
    return o


def ref(name):
    return {"$ref": f"#/$defs/{name}"}


NATIVE_DEFS = {
    "flow": obj({
        "proto": {"const": "tcp"},
        "family": {"enum": ["ipv4", "ipv6"]},
        "src_ip": IP, "src_port": U16, "dst_ip": IP, "dst_port": U16,
    }, {"community_id": {"type": "string", "pattern": "^1:[A-Za-z0-9+/]{27}=$"}},
        desc="The flow as seen on the wire at the drop point."),
    "tcp": obj({"flags": {"type": "string", "pattern": f"^({FLAG}(\\|{FLAG})*)?$",
                          "description": "Set flags joined by '|', \"\" when none."}}),
    "drop": obj({
        "reason": {"type": "string", "pattern": "^[A-Z0-9_]+$",
                   "description": "Kernel drop reason without the SKB_DROP_REASON_ prefix; "
                                  "UNAVAILABLE on kernels before 5.17."},
        "class": ref("drop_class"),
        "location": {"type": "string", "description": "function+0xoffset"},
    }, {
        "reason_code": U32,
        "storm": {**U64, "description": "The storm incident this folded record belongs to."},
    }),
    "drop_class": {"enum": ["network", "local", "unknown"],
                   "description": "network: lost on its way (policy, firewall, tc, routing, "
                                  "queues, no socket); local: the host's own socket "
                                  "housekeeping; unknown."},
    "lost": obj({
        "source": {"enum": ["kernel", "sink", "input", "correlation"]},
        "reason": {"type": "string", "minLength": 1,
                   "description": "ringbuf_full, queue_full, spool_full, rejected, shutdown, unparsable, ..."},
    }, {"sink": {"type": "string", "description": "The --output value, for source sink."}}),
    "process": obj({"pid": U32, "tgid": U32, "comm": STR, "cgroup_id": U64},
                   {"container_id": STR, "pod_uid": STR}),
    "attempt": obj({
        "id": U64, "started": TIME, "syn_retransmits": U32, "duration_ms": U64,
        "outcome": {"enum": ["timeout", "refused", "unreachable", "established_late",
                             "abandoned", "data_stalled", "refused_by_listener", "in_progress",
                             "established"]},
    }, {"data_retransmits": U32, "side": {"enum": ["client", "server"]}, "storm": U64}),
    "storm": obj({
        "id": U64, "started": TIME, "duration_ms": U64,
        "outcome": {"enum": ["in_progress", "ended"]},
        "drops": U64, "peak_per_sec": U64,
        "sources": obj({
            "distinct": U64,
            "top": {"type": "array", "items": obj({"ip": IP, "drops": U64})},
        }, {"more": {"type": "boolean"}, "estimated": {"type": "boolean"}}),
    }),
    "tcp_state": obj({"old": STR, "new": STR, "error": {"type": "integer"}},
                     desc="TCP state names of the running kernel without TCP_."),
    "retransmit": obj({"state": STR, "snd_una": U32}),
    "drop_summary": obj({"reason": STR, "class": ref("drop_class"), "location": STR,
                         "netns": U32, "count": U64}),
    "tuple": obj({"src_ip": IP, "src_port": U16, "dst_ip": IP, "dst_port": U16},
                 {"community_id": {"type": "string", "pattern": "^1:[A-Za-z0-9+/]{27}=$"}}),
    "conntrack": obj({
        "state": {"enum": ["NEW", "ESTABLISHED", "RELATED", "INVALID", "UNTRACKED", "UNREPLIED"]},
        "status": {"type": "array", "items": STR},
        "original": ref("tuple"), "reply": ref("tuple"),
        "nat": {"enum": ["dnat", "snat", "both", "none"]},
        "mark": U32, "zone": U16,
    }),
    "workload": obj({"kind": STR, "name": STR}),
    "endpoint": obj({
        "ip": {"anyOf": [IP, {"type": "null"}]},
        "host_network": {"type": "boolean"},
    }, {
        "namespace": STR, "pod": STR, "pod_uid": STR,
        "labels": {"type": "object", "additionalProperties": STR},
        "workload": ref("workload"), "service": STR, "node": STR,
    }),
    "policy_ref": obj({"namespace": STR, "name": STR},
                      {"rule": {"type": "integer", "minimum": 0}}),
    "policy": obj({
        "verdict": {"enum": ["allowed", "denied"]},
        "direction": {"enum": ["egress", "ingress"]},
        "policies": {"type": "array", "items": ref("policy_ref")},
        "explanation": STR,
    }, {"suggested_fix": STR, "fix_check": ref("fix_check")}),
    "admitted": obj({
        "from": STR, "to": STR, "port": U16,
        "protocol": {"enum": ["TCP", "UDP", "SCTP"]},
    }),
    "fix_check": obj({
        "allows_flow": {"type": "boolean"},
        "newly_allowed": {"type": "array", "items": ref("admitted")},
    }, {
        "truncated": {"type": "boolean"},
        "still_denied": {"type": "array", "items": ref("admitted")},
    }),
    "oracle": obj({}, {
        "packet": {"enum": ["CONNECT", "ACCEPT", "REFUSE", "REDIRECT", "RESEND", "DATA"]},
        "service_name": STR, "sid": STR, "program": STR, "client_host": STR,
        "client_user": STR,
        "listener": obj({"ip": IP, "port": U16}),
        "redirect": obj({"host": STR, "port": U16}),
        "redirect_ports": {"type": "array", "items": U16, "minItems": 2},
        "remedy": STR,
        "refuse": obj({"code": {"anyOf": [U32, {"type": "null"}]}, "text": STR}),
    }),
}

SECTIONS = {
    "flow": ref("flow"), "tcp": ref("tcp"), "drop": ref("drop"), "netns": U32,
    "ifindex": U32, "lost": ref("lost"), "process": ref("process"),
    "tcp_state": ref("tcp_state"), "retransmit": ref("retransmit"),
    "attempt": ref("attempt"), "drops": {"type": "array", "items": ref("drop_summary")},
    "conntrack": ref("conntrack"), "diagnosis": STR, "source": ref("endpoint"),
    "destination": ref("endpoint"), "policy": ref("policy"), "oracle": ref("oracle"),
    "storm": ref("storm"),
}

# Sections each kind always has; the others may appear (absent ones are left out, never null).
KIND_REQUIRED = {
    "drop": ["flow", "drop"],
    "lost": ["lost"],
    "stall": ["flow", "attempt"],
    "tns": ["flow", "oracle"],
    "tcp_state": ["flow", "tcp_state"],
    "retransmit": ["flow", "retransmit"],
    "conntrack": ["flow", "conntrack"],
    "storm": ["flow", "storm", "drops"],
    "connect": ["flow", "attempt"],
}
KIND_DESC = {
    "drop": "A packet of a watched flow dropped by the kernel (count = packets aggregated).",
    "lost": "Events that could not be delivered (count = how many).",
    "stall": "One connection attempt that stalled, correlated across signals.",
    "tns": "An Oracle Net (TNS) packet seen on a listener port.",
    "tcp_state": "--raw: a TCP state change of a watched socket.",
    "retransmit": "--raw: a TCP retransmission on a watched flow.",
    "conntrack": "--raw: a watched conntrack entry removed without ever seeing a reply.",
    "storm": "A flood of drops toward one destination from many sources, as one incident.",
    "connect": "--emit connects: a connect to a watched port that succeeded.",
}
KINDS = list(KIND_REQUIRED)


def native(kind):
    props = {
        "schema": {"const": "droptrace.v1"},
        "kind": {"const": kind},
        "time": TIME,
        "node": {"type": "string", "minLength": 1},
        "count": U64,
    }
    props.update(SECTIONS)
    return {
        "$schema": D, "$id": f"{ID}droptrace.v1/{kind}.schema.json",
        "title": f"droptrace.v1 {kind} event", "description": KIND_DESC[kind],
        "type": "object", "properties": props,
        "required": sorted(["schema", "kind", "time", "node", "count"] + KIND_REQUIRED[kind]),
        "additionalProperties": False, "$defs": NATIVE_DEFS,
    }


def vendor(extra_required=()):
    """The droptrace.v1 sections carried verbatim by ECS (droptrace.*) and OCSF (unmapped)."""
    props = {"schema": {"const": "droptrace.v1"},
             "kind": {"enum": KINDS}, "node": STR, "count": U64}
    props.update(SECTIONS)
    props["process"] = obj({"cgroup_id": U64})
    return {"type": "object", "properties": props,
            "required": ["schema", "kind", *extra_required], "additionalProperties": False}


COMMUNITY_ID = {"type": "string", "pattern": "^1:[A-Za-z0-9+/]{27}=$",
                "description": "Community ID v1 (seed 0) of the flow."}


def ecs():
    flow_side = obj({"ip": IP, "port": U16})
    flow_kinds = {"properties": {"droptrace": {"properties": {"kind": {"enum": [k for k in KINDS if k != "lost"]}}}}}
    return {
        "$schema": D, "$id": f"{ID}ecs/droptrace.schema.json",
        "title": "droptrace events in Elastic Common Schema 8.x",
        "description": "What `--format ecs` emits (docs/siem.md maps every field).",
        "type": "object",
        "properties": {
            "@timestamp": TIME,
            "ecs": obj({"version": {"type": "string", "pattern": r"^8\.\d+\.\d+$"}}),
            "message": STR,
            "event": obj({
                "kind": {"enum": ["event", "metric"]},
                "category": {"type": "array", "items": {"enum": ["network", "host"]}, "minItems": 1},
                "type": {"type": "array", "minItems": 1, "items": {"enum": [
                    "connection", "denied", "allowed", "start", "end", "info", "protocol"]}},
                "outcome": {"enum": ["success", "failure", "unknown"]},
                "action": {"type": "string", "pattern": "^[a-z_]+$"},
                "module": {"const": "droptrace"},
                "dataset": {"enum": [f"droptrace.{k}" for k in KINDS]},
                "provider": {"const": "droptrace"},
            }, {"reason": STR}),
            "host": obj({"name": STR}),
            "observer": obj({"hostname": STR, "type": {"const": "sensor"},
                             "product": {"const": "droptrace"}, "vendor": {"const": "droptrace"}}),
            "source": flow_side,
            "destination": flow_side,
            "network": obj({
                "transport": {"const": "tcp"}, "iana_number": {"const": "6"},
                "type": {"enum": ["ipv4", "ipv6"]},
            }, {"direction": {"enum": ["ingress", "egress"]}, "protocol": {"const": "tns"},
                "community_id": COMMUNITY_ID}),
            "process": obj({"pid": U32, "name": STR, "thread": obj({"id": U32})}),
            "container": obj({"id": STR}),
            "orchestrator": obj({
                "type": {"const": "kubernetes"},
                "resource": obj({"type": {"const": "pod"}, "name": STR}),
            }, {"namespace": STR}),
            "kubernetes": obj({}, {
                "namespace": STR, "pod": obj({}, {"name": STR, "uid": STR}),
                "labels": {"type": "object", "additionalProperties": STR},
                "node": obj({"name": STR}),
            }, desc="Beats-style (non-ECS) fields of the subject pod."),
            "rule": obj({"ruleset": {"const": "kubernetes-networkpolicy"}, "name": STR,
                         "category": {"enum": ["allowed", "denied"]}, "description": STR}),
            "droptrace": vendor(["count"]),
        },
        "required": ["@timestamp", "ecs", "message", "event", "host", "observer", "droptrace"],
        "additionalProperties": False,
        "allOf": [{
            "if": flow_kinds,
            "then": {"required": ["destination", "network"]},
        }, {
            # Every flow has a Community ID, except a storm's folded one (no source).
            "if": {"required": ["source"]},
            "then": {"properties": {"network": {"required": ["community_id"]}}},
        }],
        "$defs": NATIVE_DEFS,
    }


def ocsf():
    activities = {1: "Open", 2: "Close", 3: "Reset", 4: "Fail", 5: "Refuse", 6: "Traffic",
                  7: "Listen", 99: "Other"}
    endpoint = obj({}, {"ip": IP, "port": U16, "hostname": STR})
    return {
        "$schema": D, "$id": f"{ID}ocsf/network_activity.schema.json",
        "title": "droptrace events as OCSF 1.x Network Activity (class_uid 4001)",
        "description": "What `--format ocsf` emits (docs/siem.md maps every attribute).",
        "type": "object",
        "properties": {
            "class_uid": {"const": 4001}, "class_name": {"const": "Network Activity"},
            "category_uid": {"const": 4}, "category_name": {"const": "Network Activity"},
            "activity_id": {"enum": sorted(activities)},
            "activity_name": {"enum": list(activities.values())},
            "type_uid": {"enum": [400100 + a for a in sorted(activities)]},
            "type_name": {"enum": [f"Network Activity: {n}" for n in activities.values()]},
            "time": {"type": "integer", "minimum": 0, "description": "Epoch milliseconds."},
            "severity_id": {"enum": [0, 1, 2, 3, 4, 5, 6, 99]},
            "severity": {"enum": ["Unknown", "Informational", "Low", "Medium", "High"]},
            "status_id": {"enum": [0, 1, 2, 99]},
            "status": {"enum": ["Unknown", "Success", "Failure"]},
            "status_detail": STR, "message": STR, "count": U64,
            "metadata": obj({
                "version": {"type": "string", "pattern": r"^1\.\d+\.\d+$"},
                "product": obj({"name": {"const": "droptrace"}}, {"vendor_name": STR}),
            }, {
                "log_name": {"enum": KINDS},
                "event_code": {"enum": KINDS},
                "profiles": {"type": "array", "items": {"enum": ["host", "security_control"]}},
            }),
            "device": obj({"hostname": STR, "type_id": {"const": 1}, "type": {"const": "Server"}}),
            "src_endpoint": endpoint, "dst_endpoint": endpoint,
            "connection_info": obj({"direction_id": {"enum": [0, 1, 2, 3, 4, 99]}}, {
                "direction": {"enum": ["Unknown", "Inbound", "Outbound"]},
                "protocol_num": {"const": 6}, "protocol_name": {"const": "tcp"},
                "protocol_ver_id": {"enum": [4, 6]}, "community_uid": COMMUNITY_ID,
                "tcp_flags": {"type": "integer", "minimum": 0, "maximum": 255},
            }),
            "actor": obj({"process": obj({"pid": U32}, {
                "tid": U32, "name": STR, "container": obj({"uid": STR})})}),
            "action_id": {"enum": [0, 1, 2, 99]}, "action": {"enum": ["Allowed", "Denied"]},
            "disposition_id": {"enum": [1, 2, 6]},
            "disposition": {"enum": ["Allowed", "Blocked", "Dropped"]},
            "policy": obj({"name": STR}, {"desc": STR}),
            "unmapped": obj({"droptrace": vendor(["node"])}),
        },
        "required": ["activity_id", "category_uid", "class_uid", "metadata", "severity_id",
                     "time", "type_uid"],
        "anyOf": [{"required": ["src_endpoint"]}, {"required": ["dst_endpoint"]}],
        "additionalProperties": False,
        "$defs": NATIVE_DEFS,
    }


def write(rel, schema):
    path = os.path.join(HERE, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(schema, f, indent=2)
        f.write("\n")


for k in KIND_REQUIRED:
    write(f"droptrace.v1/{k}.schema.json", native(k))
write("ecs/droptrace.schema.json", ecs())
write("ocsf/network_activity.schema.json", ocsf())
