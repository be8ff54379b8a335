//! The output thread: its own current-thread runtime, so disk and network I/O never run on
//! the tracing loop's runtime. It connects the sinks, serves `--metrics`, encodes each event
//! once for every sink, announces discards every second, and at shutdown drains within
//! `--flush-timeout`, keeping what is left in the spools.
use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot, watch};

use super::{
    OutputError,
    delivery::{Phase, SinkCtx, SinkHandle, delivery, intake},
    k8s_events,
    lost::{LostMaker, unreported},
    metrics::{self, Metrics},
    sink::{DeliverError, Record, Transport},
    stats::{DISCARDS, Discard, OutputSummary, SinkStats, SinkSummary},
};
use crate::{encode::Format, event::Event};

/// `--k8s-events` as the output thread starts it.
pub(super) struct K8sEvents {
    pub(super) stats: Arc<SinkStats>,
    pub(super) config: kube::Config,
    pub(super) node: String,
    pub(super) queue: usize,
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn run_outputs(
    workers: Vec<(Arc<SinkCtx>, Transport, mpsc::Receiver<Arc<Record>>)>,
    (events, encode): (mpsc::Receiver<Queued>, Encoding),
    (sinks, k8s): (Arc<Vec<SinkHandle>>, Option<K8sEvents>),
    lost: Arc<LostMaker>,
    metrics: Option<(Arc<Metrics>, std::net::TcpListener)>,
    flush_timeout: Duration,
    ready: oneshot::Sender<Result<(), OutputError>>,
    stop: oneshot::Receiver<tokio::time::Instant>,
    done: oneshot::Sender<OutputSummary>,
) {
    // Reachability at start: a SIEM that is down (or not up yet) must not stop tracing. The
    // sink starts "down" and its delivery task connects as soon as the receiver answers.
    let mut workers = workers;
    for (ctx, t, _) in workers.iter_mut() {
        if let Err(e) = t.connect().await {
            if let DeliverError::Untrusted(why) = e {
                let _ = ready.send(Err(OutputError::Sink {
                    sink: ctx.name.clone(),
                    why,
                }));
                return;
            }
            ctx.stats.down.store(true, Ordering::Relaxed);
            tracing::warn!(
                sink = %ctx.name,
                "receiver unreachable at start ({}); {}",
                e.why(),
                if ctx.has_spool {
                    "spooling until it answers"
                } else {
                    "holding --queue-size events in memory until it answers, counting the \
                     rest as lost (--spool-dir keeps them)"
                }
            );
        }
    }
    // The Events writer's client is made here, so its connections live on this thread.
    let k8s = match k8s {
        Some(k) => match kube::Client::try_from(k.config.clone()) {
            Ok(client) => Some((k, client)),
            Err(e) => {
                let _ = ready.send(Err(OutputError::Sink {
                    sink: k8s_events::SINK_NAME.into(),
                    why: e.to_string(),
                }));
                return;
            }
        },
        None => None,
    };
    let server = match metrics {
        Some((m, l)) => match tokio::net::TcpListener::from_std(l) {
            Ok(l) => Some(tokio::spawn(metrics::serve(l, m))),
            Err(e) => {
                let _ = ready.send(Err(OutputError::Metrics {
                    addr: String::new(),
                    why: e.to_string(),
                }));
                return;
            }
        },
        None => None,
    };
    let _ = ready.send(Ok(()));

    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let mut tasks = Vec::new();
    let contexts: Vec<_> = workers.iter().map(|(c, _, _)| c.clone()).collect();
    let mut transports = Vec::new();
    for (ctx, transport, rx) in workers {
        let (give_back, returned) = oneshot::channel();
        transports.push(returned);
        let (direct_tx, direct_rx) = mpsc::channel(ctx.batch.max(64));
        tasks.push(tokio::spawn(intake(
            ctx.clone(),
            rx,
            direct_tx,
            phase_rx.clone(),
        )));
        tasks.push(tokio::spawn(delivery(
            ctx,
            (transport, give_back),
            direct_rx,
            lost.clone(),
            phase_rx.clone(),
        )));
    }

    let mut k8s_feed = None;
    let mut k8s_stats = None;
    let mut k8s_taken = None;
    if let Some((k, client)) = k8s {
        let (tx, rx) = mpsc::channel(k.queue);
        let writer = k8s_events::Writer::new(client, &k.node, k.stats.clone());
        let (taken_tx, taken_rx) = oneshot::channel();
        k8s_taken = Some(taken_rx);
        tasks.push(tokio::spawn(k8s_events::run(
            writer,
            rx,
            phase_rx.clone(),
            taken_tx,
        )));
        k8s_feed = Some((tx, k.stats.clone()));
        k8s_stats = Some(k.stats);
    }
    let sources: Vec<(String, Arc<SinkStats>)> = sinks
        .iter()
        .map(|s| (s.name.clone(), s.stats.clone()))
        .chain(
            k8s_stats
                .iter()
                .map(|s| (k8s_events::SINK_NAME.to_string(), s.clone())),
        )
        .collect();

    let (hurry_tx, hurry_rx) = watch::channel(false);
    let mut encoder = tokio::spawn(encode_all(
        events,
        (sinks.clone(), k8s_feed),
        encode,
        hurry_rx,
    ));

    // Running: announce discards once a second until asked to stop.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(stop);
    let deadline = loop {
        tokio::select! {
            _ = tick.tick() => report_lost(&sources, &sinks, &lost),
            d = &mut stop => break d.unwrap_or_else(|_| tokio::time::Instant::now() + flush_timeout),
        }
    };
    // The sender is gone: the encoder ends once it has handed on what was queued. A lossless
    // encoder waiting on a stuck sink is told to hurry at the deadline (then whatever a sink
    // cannot take is counted by that sink).
    if tokio::time::timeout_at(deadline, &mut encoder)
        .await
        .is_err()
    {
        let _ = hurry_tx.send(true);
        let _ = encoder.await;
    }
    // The Events writer has counted what it turned down: announce that too.
    if let Some(t) = k8s_taken {
        let _ = tokio::time::timeout_at(deadline, t).await;
    }
    report_lost(&sources, &sinks, &lost);
    let _ = phase_tx.send(Phase::Draining);
    let mut joined = futures_join(&mut tasks, Some(deadline)).await;
    let timed_out = !joined;
    if !joined {
        let _ = phase_tx.send(Phase::Stop);
        // Spooling what is left is local disk work; give it a bounded moment.
        joined = futures_join(
            &mut tasks,
            Some(tokio::time::Instant::now() + Duration::from_secs(5)),
        )
        .await;
        if !joined {
            for t in &tasks {
                t.abort();
            }
        }
    }
    // Discards counted while draining (a sink that never caught up, with no spool to keep
    // what it held): announced to the sinks that are still up, straight through their
    // transports, so they too have their `lost` record.
    let finals = unreported(&sources, &lost);
    for (ctx, returned) in contexts.iter().zip(transports) {
        let Ok(mut t) = returned.await else { continue };
        let recs: Vec<_> = finals
            .iter()
            .filter(|(from, _)| *from != ctx.name)
            .map(|(_, r)| r.clone())
            .collect();
        if !recs.is_empty() {
            let n = recs.len() as u64;
            let sent = ctx.stats.up()
                && matches!(
                    tokio::time::timeout(FINAL_REPORT_TIMEOUT, t.deliver(&recs)).await,
                    Ok(Ok(_))
                );
            if sent {
                ctx.stats.sent.fetch_add(n, Ordering::Relaxed);
            } else if let Some(sp) = ctx.lock().spool.as_mut() {
                for r in &recs {
                    let _ = sp.append_unbounded(r);
                }
            }
        }
        t.close().await;
    }
    // Discards that could not be announced in-stream any more: keep the announcement in
    // the sink's own spool so the next run delivers it.
    for ctx in &contexts {
        let mut sh = ctx.lock();
        if let Some(sp) = sh.spool.as_mut() {
            for why in DISCARDS {
                let d = ctx.stats.discarded[why as usize].load(Ordering::Relaxed)
                    - ctx.stats.reported_self[why as usize].load(Ordering::Relaxed);
                if d > 0 {
                    let (_, rec) = lost.record(&ctx.name, why, d);
                    if sp.append_unbounded(&rec).is_ok() {
                        ctx.stats.reported_self[why as usize].fetch_add(d, Ordering::Relaxed);
                    }
                }
            }
        }
        ctx.update_gauge(&sh);
    }
    if let Some(s) = server {
        s.abort();
    }
    let summary = OutputSummary {
        sinks: contexts
            .iter()
            .map(|c| (&c.name, &c.stats))
            .chain(k8s_stats.iter().map(|s| (&sources[sources.len() - 1].0, s)))
            .map(|(name, stats)| SinkSummary {
                name: name.clone(),
                sent: stats.sent(),
                errors: stats.errors(),
                discarded: stats.discarded(),
                spooled: stats.spooled(),
            })
            .collect(),
        timed_out,
    };
    let _ = done.send(summary);
}

/// How the encoder task encodes: the format, whether records need the OTLP sidecar, and
/// whether to wait for room in the queues (replay).
#[derive(Debug, Clone, Copy)]
pub(super) struct Encoding {
    pub(super) format: Format,
    pub(super) otlp: bool,
    pub(super) lossless: bool,
}

/// Stall incidents on their way to the Kubernetes Events writer, and its counters.
type K8sFeed = (mpsc::Sender<Arc<Event>>, Arc<SinkStats>);

/// What the output thread is handed: one event from the tracing loop, or a batch of them
/// from `replay` (one hand-off between the threads for many lines).
pub(super) enum Queued {
    One(Arc<Event>),
    Batch(Vec<Event>),
}

/// Encodes each event once and queues the line on every sink; hands stall incidents to the
/// Kubernetes Events writer.
async fn encode_all(
    mut events: mpsc::Receiver<Queued>,
    (sinks, k8s): (Arc<Vec<SinkHandle>>, Option<K8sFeed>),
    encoding: Encoding,
    mut hurry: watch::Receiver<bool>,
) {
    let mut buf = Vec::with_capacity(4096);
    while let Some(q) = events.recv().await {
        match q {
            Queued::One(e) => {
                let k8s = k8s.as_ref();
                encode_one(&e, Some(&e), (&sinks, k8s), encoding, &mut hurry, &mut buf).await;
            }
            Queued::Batch(batch) => {
                for e in &batch {
                    let k8s = k8s.as_ref();
                    encode_one(e, None, (&sinks, k8s), encoding, &mut hurry, &mut buf).await;
                }
            }
        }
    }
}

/// One event of [`encode_all`]; `shared` is `e` when it is reference counted already.
async fn encode_one(
    e: &Event,
    shared: Option<&Arc<Event>>,
    (sinks, k8s): (&[SinkHandle], Option<&K8sFeed>),
    encoding: Encoding,
    hurry: &mut watch::Receiver<bool>,
    buf: &mut Vec<u8>,
) {
    let Encoding {
        format,
        otlp,
        lossless,
    } = encoding;
    if let Some((tx, stats)) = k8s {
        let n = k8s_events::events_for(e, "").len() as u64;
        if n > 0 {
            let e = shared.cloned().unwrap_or_else(|| Arc::new(e.clone()));
            let sent = if lossless && !*hurry.borrow() {
                tx.send(e).await.is_ok()
            } else {
                tx.try_send(e).is_ok()
            };
            if !sent {
                stats.discard(Discard::QueueFull, n);
            }
        }
    }
    let rec = Arc::new(Record::new(format, otlp, e, buf));
    for s in sinks {
        if !lossless || *hurry.borrow() {
            s.push(&rec);
            continue;
        }
        // Lossless: wait only when the queue is full (the common case needs no select).
        let rec = match s.tx.try_send(rec.clone()) {
            Ok(()) => continue,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                s.stats.discard(Discard::Shutdown, 1);
                continue;
            }
            Err(mpsc::error::TrySendError::Full(rec)) => rec,
        };
        tokio::select! {
            r = s.tx.send(rec.clone()) => if r.is_err() {
                s.stats.discard(Discard::Shutdown, 1);
            },
            _ = hurry.wait_for(|h| *h) => s.push(&rec),
        }
    }
}

/// Waits for every task, until `deadline`; true when all ended.
async fn futures_join(
    tasks: &mut [tokio::task::JoinHandle<()>],
    deadline: Option<tokio::time::Instant>,
) -> bool {
    for t in tasks.iter_mut() {
        if t.is_finished() {
            continue;
        }
        match deadline {
            Some(d) => {
                if tokio::time::timeout_at(d, &mut *t).await.is_err() {
                    return false;
                }
            }
            None => {
                let _ = (&mut *t).await;
            }
        }
    }
    true
}

/// Tells every other sink about each output's new discards (`sources`: the sinks, and the
/// Kubernetes Events writer, which has no stream of its own).
fn report_lost(sources: &[(String, Arc<SinkStats>)], sinks: &[SinkHandle], lost: &LostMaker) {
    for (name, rec) in unreported(sources, lost) {
        for other in sinks.iter().filter(|o| o.name != name) {
            other.push(&rec);
        }
    }
}

/// At exit, how long a sink that is up gets to take the last loss announcements.
const FINAL_REPORT_TIMEOUT: Duration = Duration::from_secs(2);
