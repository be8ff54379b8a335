//! One sink's delivery: its bounded memory queue ([`SinkHandle`]), the intake task (queue ->
//! direct channel, or the spool tail while the spool holds anything) and the delivery task
//! (direct channel first, then the spool head; retries with backoff; failed batches back to
//! the FRONT of the spool; its own discards announced once it catches up).
use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot, watch};

use super::{
    lost::LostMaker,
    sink::{DeliverError, Record, Transport},
    spool,
    stats::{DISCARDS, Discard, SinkStats},
};

pub(super) struct SinkHandle {
    pub(super) name: String,
    pub(super) tx: mpsc::Sender<Arc<Record>>,
    pub(super) stats: Arc<SinkStats>,
}

impl SinkHandle {
    pub(super) fn push(&self, rec: &Arc<Record>) {
        if self.tx.try_send(rec.clone()).is_err() {
            self.stats.discard(Discard::QueueFull, 1);
        }
    }
}

pub(super) struct SinkCtx {
    pub(super) name: String,
    pub(super) stats: Arc<SinkStats>,
    pub(super) has_spool: bool,
    pub(super) shared: Mutex<Shared>,
    pub(super) batch: usize,
    /// When this sink last announced its own discards: at most once per
    /// [`SELF_REPORT_EVERY`] while running, so a sustained overload is one `lost` record a
    /// second, not one per queue drain.
    pub(super) last_self_report: Mutex<Option<std::time::Instant>>,
}

const SELF_REPORT_EVERY: Duration = Duration::from_secs(1);

pub(super) struct Shared {
    pub(super) spool: Option<spool::Spool>,
    /// New records go to the spool tail (set while the spool holds anything).
    pub(super) spooling: bool,
}

impl SinkCtx {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panic while holding the lock cannot leave the spool worse than a crash would.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Discards of this sink not yet announced to itself.
    fn pending_self(&self) -> bool {
        DISCARDS.iter().any(|w| {
            let i = *w as usize;
            self.stats.discarded[i].load(Ordering::Relaxed)
                > self.stats.reported_self[i].load(Ordering::Relaxed)
        })
    }

    fn self_report_due(&self) -> bool {
        self.last_self_report
            .lock()
            .map(|t| t.is_none_or(|t| t.elapsed() >= SELF_REPORT_EVERY))
            .unwrap_or(true)
    }

    pub(super) fn update_gauge(&self, sh: &Shared) {
        if let Some(s) = &sh.spool {
            self.stats.spooled.store(s.records(), Ordering::Relaxed);
        }
    }

    /// Appends to the spool tail; what does not fit is a counted discard.
    fn spool_append(&self, sh: &mut Shared, recs: &[Arc<Record>]) {
        let Some(sp) = sh.spool.as_mut() else {
            self.stats.discard(Discard::Shutdown, recs.len() as u64);
            return;
        };
        match sp.append(recs) {
            Ok(over) => self.stats.discard(Discard::SpoolFull, over as u64),
            Err(e) => {
                tracing::warn!(sink = %self.name, "spool write failed: {e}");
                self.stats.discard(Discard::SpoolFull, recs.len() as u64);
            }
        }
        self.update_gauge(sh);
    }

    /// Puts an undelivered batch back in front of the spool (or counts it lost without one).
    fn spool_prepend(&self, sh: &mut Shared, recs: &[Arc<Record>]) {
        let Some(sp) = sh.spool.as_mut() else {
            self.stats.discard(Discard::Shutdown, recs.len() as u64);
            return;
        };
        if let Err(e) = sp.prepend(recs) {
            tracing::warn!(sink = %self.name, "spool write failed: {e}");
            self.stats.discard(Discard::SpoolFull, recs.len() as u64);
        }
        sh.spooling = true;
        self.update_gauge(sh);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Running,
    /// Stop taking new events; deliver what is queued and spooled.
    Draining,
    /// Flush deadline: stop delivering, keep the rest in the spool.
    Stop,
}

pub(super) async fn phase_at_least(rx: &mut watch::Receiver<Phase>, p: Phase) {
    let _ = rx.wait_for(|x| rank(*x) >= rank(p)).await;
}

fn rank(p: Phase) -> u8 {
    match p {
        Phase::Running => 0,
        Phase::Draining => 1,
        Phase::Stop => 2,
    }
}

fn drain(rx: &mut mpsc::Receiver<Arc<Record>>, max: usize, into: &mut Vec<Arc<Record>>) {
    while into.len() < max {
        match rx.try_recv() {
            Ok(r) => into.push(r),
            Err(_) => break,
        }
    }
}

/// Memory queue -> direct channel or spool tail.
pub(super) async fn intake(
    ctx: Arc<SinkCtx>,
    mut rx: mpsc::Receiver<Arc<Record>>,
    direct: mpsc::Sender<Arc<Record>>,
    mut phase: watch::Receiver<Phase>,
) {
    let mut closed = false;
    loop {
        let first = tokio::select! {
            biased;
            r = rx.recv() => r,
            _ = phase_at_least(&mut phase, Phase::Draining), if !closed => {
                // Stop accepting; what is queued is still received below.
                rx.close();
                closed = true;
                continue;
            }
        };
        let Some(first) = first else { break };
        let mut items = vec![first];
        drain(&mut rx, 1024, &mut items);
        if ctx.has_spool {
            let mut sh = ctx.lock();
            let mut to_spool = Vec::new();
            for r in items {
                if sh.spooling {
                    to_spool.push(r);
                } else if let Err(e) = direct.try_send(r) {
                    sh.spooling = true;
                    to_spool.push(e.into_inner());
                }
            }
            if !to_spool.is_empty() {
                ctx.spool_append(&mut sh, &to_spool);
            }
        } else {
            let mut items = items.into_iter();
            while let Some(r) = items.next() {
                // Waits (for room or the deadline) only when the direct channel is full.
                let r = match direct.try_send(r) {
                    Ok(()) => continue,
                    Err(mpsc::error::TrySendError::Full(r)) => r,
                    Err(mpsc::error::TrySendError::Closed(r)) => r,
                };
                let stop = tokio::select! {
                    res = direct.send(r) => res.is_err(),
                    _ = phase_at_least(&mut phase, Phase::Stop) => true,
                };
                if stop {
                    // At the deadline without a spool: what is still here is lost.
                    let rest = 1 + items.len() as u64;
                    ctx.stats.discard(Discard::Shutdown, rest);
                    rx.close();
                    let mut n = 0;
                    while rx.try_recv().is_ok() {
                        n += 1;
                    }
                    ctx.stats.discard(Discard::Shutdown, n);
                    return;
                }
            }
        }
    }
}

enum Source {
    Direct,
    Spool(spool::Peeked),
    /// This sink's own discard announcement: counts as reported only once delivered.
    SelfLost(Vec<(Discard, u64)>),
}

/// Direct channel first, then spool; delivers with retries; hands failures to the spool.
/// Hands its transport back when done (still connected, for the final loss announcements).
pub(super) async fn delivery(
    ctx: Arc<SinkCtx>,
    (mut transport, give_back): (Transport, oneshot::Sender<Transport>),
    mut direct: mpsc::Receiver<Arc<Record>>,
    lost: Arc<LostMaker>,
    mut phase: watch::Receiver<Phase>,
) {
    let mut backoff = Backoff::default();
    // Announced once already when the receiver was not up at start.
    let mut down = !ctx.stats.up();
    let mut direct_open = true;
    'outer: loop {
        if *phase.borrow() == Phase::Stop {
            break;
        }
        let mut batch = Vec::new();
        let mut source = Source::Direct;
        drain(&mut direct, ctx.batch, &mut batch);
        if batch.is_empty() {
            let urgent = !direct_open || *phase.borrow() != Phase::Running;
            match from_spool_or_self(&ctx, &lost, urgent) {
                Ok(Some((b, src))) => {
                    batch = b;
                    source = src;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(sink = %ctx.name, "spool read failed: {e}");
                    if sleep_or_stop(&mut phase, backoff.next()).await {
                        break;
                    }
                    continue;
                }
            }
        }
        if batch.is_empty() {
            if !direct_open {
                // Draining, intake gone, spool empty: done.
                break;
            }
            tokio::select! {
                r = direct.recv() => match r {
                    Some(r) => batch.push(r),
                    None => { direct_open = false; continue; }
                },
                _ = phase.changed() => continue,
                // Discards held back by the once-a-second limit: announce them when due.
                _ = tokio::time::sleep(SELF_REPORT_EVERY), if ctx.pending_self() => continue,
            }
            drain(&mut direct, ctx.batch, &mut batch);
        }

        loop {
            let res = tokio::select! {
                r = transport.deliver(&batch) => Some(r),
                _ = phase_at_least(&mut phase, Phase::Stop) => None,
            };
            let n = batch.len() as u64;
            match res {
                Some(Ok(rejected)) => {
                    if down {
                        tracing::info!(sink = %ctx.name, "sink recovered");
                        down = false;
                        ctx.stats.down.store(false, Ordering::Relaxed);
                    }
                    backoff = Backoff::default();
                    ctx.stats.sent.fetch_add(n - rejected, Ordering::Relaxed);
                    ctx.stats.discard(Discard::Rejected, rejected);
                    finish(&ctx, source);
                    break;
                }
                Some(Err(DeliverError::Rejected(why))) => {
                    tracing::warn!(sink = %ctx.name, "receiver rejected {n} events: {why}");
                    ctx.stats.discard(Discard::Rejected, n);
                    finish(&ctx, source);
                    break;
                }
                // While running, an untrusted certificate is one more reason to retry.
                Some(Err(e)) => {
                    let (after, why) = match e {
                        DeliverError::Retry { after, why } => (after, why),
                        other => (None, other.why().to_string()),
                    };
                    ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if !down {
                        tracing::warn!(sink = %ctx.name, "sink unavailable: {why}; {}",
                            if ctx.has_spool { "spooling" } else { "retrying from memory" });
                        down = true;
                        ctx.stats.down.store(true, Ordering::Relaxed);
                    }
                    let wait = after.unwrap_or_else(|| backoff.next()).min(MAX_RETRY_AFTER);
                    if matches!(source, Source::Direct) && ctx.has_spool {
                        // Everything from here on goes through the spool, in order.
                        {
                            let mut sh = ctx.lock();
                            sh.spooling = true;
                            drain(&mut direct, usize::MAX, &mut batch);
                            ctx.spool_prepend(&mut sh, &batch);
                        }
                        if sleep_or_stop(&mut phase, wait).await {
                            break 'outer;
                        }
                        continue 'outer;
                    }
                    if matches!(source, Source::SelfLost(_)) {
                        // Recomputed (with any newer discards) on the next round.
                        if sleep_or_stop(&mut phase, wait).await {
                            break 'outer;
                        }
                        continue 'outer;
                    }
                    if sleep_or_stop(&mut phase, wait).await {
                        // A spooled batch is still in the spool; a direct one (no spool)
                        // is counted below.
                        if matches!(source, Source::Direct) {
                            ctx.stats.discard(Discard::Shutdown, n);
                        }
                        break 'outer;
                    }
                }
                None => {
                    // Deadline with a batch in flight: it may have been partly written
                    // (at-least-once here). Keep it unless it is already in the spool.
                    if matches!(source, Source::Direct) {
                        let mut sh = ctx.lock();
                        ctx.spool_prepend(&mut sh, &batch);
                    }
                    break 'outer;
                }
            }
        }
    }
    // Whatever is still in the direct channel goes in front of the spool (or is lost).
    let mut rest = Vec::new();
    drain(&mut direct, usize::MAX, &mut rest);
    if !rest.is_empty() {
        let mut sh = ctx.lock();
        ctx.spool_prepend(&mut sh, &rest);
    }
    if let Err(mut t) = give_back.send(transport) {
        t.close().await;
    }
}

/// With the direct channel empty: the spool head, else (caught up) this sink's own pending
/// discard announcements, else nothing.
/// `urgent` (draining): announce pending discards now, not at the next one-second mark.
fn from_spool_or_self(
    ctx: &SinkCtx,
    lost: &LostMaker,
    urgent: bool,
) -> std::io::Result<Option<(Vec<Arc<Record>>, Source)>> {
    let mut sh = ctx.lock();
    while let Some(sp) = sh.spool.as_mut().filter(|s| !s.is_empty()) {
        let Some(p) = sp.peek(ctx.batch)? else { break };
        // A line the spool cannot read back (disk corruption, a foreign file) is counted
        // lost, never sent as an empty event.
        let good: Vec<_> = p
            .records
            .iter()
            .filter(|r| !r.line.is_empty())
            .cloned()
            .collect();
        let bad = (p.records.len() - good.len()) as u64;
        if bad > 0 {
            tracing::warn!(sink = %ctx.name, "{bad} unreadable spool lines counted lost");
            ctx.stats.discard(Discard::SpoolFull, bad);
        }
        if good.is_empty() {
            sp.commit(&p)?;
            ctx.update_gauge(&sh);
            continue;
        }
        return Ok(Some((good, Source::Spool(p))));
    }
    // Caught up: intake may go direct again.
    sh.spooling = false;
    drop(sh);
    let pending: Vec<_> = DISCARDS
        .iter()
        .map(|w| {
            let i = *w as usize;
            let n = ctx.stats.discarded[i].load(Ordering::Relaxed)
                - ctx.stats.reported_self[i].load(Ordering::Relaxed);
            (*w, n)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    if pending.is_empty() || !(urgent || ctx.self_report_due()) {
        return Ok(None);
    }
    if let Ok(mut t) = ctx.last_self_report.lock() {
        *t = Some(std::time::Instant::now());
    }
    let batch = pending
        .iter()
        .map(|(w, n)| lost.record(&ctx.name, *w, *n).1)
        .collect();
    Ok(Some((batch, Source::SelfLost(pending))))
}

/// Most we wait on a receiver's Retry-After before trying again.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

fn finish(ctx: &SinkCtx, source: Source) {
    match source {
        Source::Direct => {}
        Source::Spool(p) => {
            let mut sh = ctx.lock();
            if let Some(sp) = sh.spool.as_mut()
                && let Err(e) = sp.commit(&p)
            {
                tracing::warn!(sink = %ctx.name, "spool commit failed: {e}");
            }
            ctx.update_gauge(&sh);
        }
        Source::SelfLost(reported) => {
            for (why, n) in reported {
                ctx.stats.reported_self[why as usize].fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// Sleeps, returning true early if the flush deadline passed meanwhile.
async fn sleep_or_stop(phase: &mut watch::Receiver<Phase>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *phase.borrow() == Phase::Stop,
        _ = phase_at_least(phase, Phase::Stop) => true,
    }
}

/// Exponential backoff: 100 ms doubling to 30 s.
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(100))
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(30));
        d
    }
}
