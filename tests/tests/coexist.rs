//! Other BPF users on the same node: droptrace's TNS programs share the cgroup v2 root's
//! cgroup_skb hooks with another agent's program (attached with bpftool in multi mode), in
//! either order, and the other program keeps running after droptrace exits.
use droptrace_tests::{
    cgroup_prog::OtherCgroupProgram,
    scenario::RedirectedLeg,
    tracer::{Droptrace, at, str_at},
};

/// The tests share one hook (the root's ingress), and an exclusive attachment excludes the
/// others: one test at a time.
static ROOT_HOOK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn root_hook() -> std::sync::MutexGuard<'static, ()> {
    ROOT_HOOK.lock().unwrap_or_else(|p| p.into_inner())
}

/// droptrace still follows TNS: the stall of the redirected leg names the listener that
/// redirected it, which only the cgroup_skb programs can have seen.
fn traces_the_redirected_leg(tracer: Droptrace, leg: &RedirectedLeg) {
    leg.connect();
    let s = leg.final_stall(&tracer);
    let fin = tracer.stop();
    println!("stall: {s}");
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    assert!(
        !fin.stderr.contains("Oracle TNS not followed"),
        "{}",
        fin.stderr
    );
    assert_eq!(str_at(&s, "attempt.outcome"), "timeout", "{s}");
    assert_eq!(
        str_at(&s, "oracle.listener.ip"),
        leg.listener.ip().to_string()
    );
    assert_eq!(at(&s, "oracle.listener.port"), 1521, "{s}");
    assert_eq!(at(&s, "oracle.redirect.port"), leg.second.port(), "{s}");
    assert_eq!(str_at(&s, "oracle.program"), "sqlplus", "{s}");
}

/// After droptrace is gone the other program is still attached (multi) and still counting.
fn other_program_survives(other: &OtherCgroupProgram, leg: &RedirectedLeg) {
    assert!(other.attached_multi(), "{}", other.root_programs());
    let before = other.count();
    // Fresh traffic through the root's ingress hook: the listener leg again.
    let _ = droptrace_tests::oracle_client::connect(
        &leg.topo.app,
        leg.topo.db_ip,
        1521,
        RedirectedLeg::SERVICE,
        1.0,
    );
    let after = other.count();
    println!("other program counted {before} -> {after} packets");
    assert!(after > before, "still counting: {before} -> {after}");
}

#[test]
fn other_cgroup_program_attached_before_droptrace() {
    let _hook = root_hook();
    let leg = RedirectedLeg::new(40124);
    let mut other = OtherCgroupProgram::load("before");
    other.attach_multi().expect("attach the other program");
    let seen = other.count();

    let tracer = Droptrace::start(&[]);
    assert!(other.attached_multi(), "{}", other.root_programs());
    traces_the_redirected_leg(tracer, &leg);
    // It saw the scenario's packets too (it ran next to droptrace, not instead of it).
    assert!(other.count() > seen);

    other_program_survives(&other, &leg);
}

#[test]
fn other_cgroup_program_attached_while_droptrace_runs() {
    let _hook = root_hook();
    let leg = RedirectedLeg::new(40125);
    let mut other = OtherCgroupProgram::load("while");

    let tracer = Droptrace::start(&[]);
    other
        .attach_multi()
        .unwrap_or_else(|e| panic!("attach next to droptrace: {e}\n{}", other.root_programs()));
    let seen = other.count();
    traces_the_redirected_leg(tracer, &leg);
    assert!(other.count() > seen);

    other_program_survives(&other, &leg);
}

/// An agent that took the ingress hook exclusively (no `multi`) leaves no room for anyone:
/// droptrace says why in one line, keeps the other program, and traces everything else.
#[test]
fn exclusive_cgroup_program_is_named_not_replaced() {
    let _hook = root_hook();
    let leg = RedirectedLeg::new(40126);
    let mut other = OtherCgroupProgram::load("exclusive");
    other.attach_exclusive().expect("attach exclusively");

    let tracer = Droptrace::start(&[]);
    leg.connect();
    let s = leg.final_stall(&tracer);
    let fin = tracer.stop();
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    let root = other.cgroup.display().to_string();
    assert!(
        fin.stderr.contains(&format!(
            "Oracle TNS not followed: program tns_ingress: cannot attach to {root} (ingress): \
             Operation not permitted (os error 1): another program holds this hook in \
             exclusive or override mode (see `bpftool cgroup show {root}`)"
        )),
        "{}",
        fin.stderr
    );
    // The drop is still traced (the stall just lacks the listener's REDIRECT).
    assert_eq!(str_at(&s, "attempt.outcome"), "timeout", "{s}");
    // The other agent's program is still the one exclusive program there.
    assert!(other.attached_exclusive(), "{}", other.root_programs());
}
