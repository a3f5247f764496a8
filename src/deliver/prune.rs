//! Retention: the delivery log, the incoming events and the conversions' merged state are
//! kept for `retention`, then deleted in small slices that interleave with ingest and
//! delivery, so pruning never stops either.

use crate::plan::Plan;
use crate::store::Store;
use arc_swap::ArcSwap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Rows deleted per slice (per table).
const SLICE: usize = 500;

/// How often to prune for a given retention: a quarter of it, between 250 ms and a minute.
pub fn prune_every(retention: Duration) -> Duration {
    (retention / 4).clamp(Duration::from_millis(250), Duration::from_secs(60))
}

/// Prunes until `shutdown` flips.
pub async fn prune_loop(
    store: Store,
    plan: Arc<ArcSwap<Plan>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let retention = plan.load().settings.retention;
        let before = crate::now_ms() - retention.as_millis() as i64;
        let mut total = 0;
        loop {
            match store.prune(before, SLICE).await {
                Ok(n) => {
                    total += n;
                    if n < SLICE || *shutdown.borrow() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot prune the delivery log; will try again");
                    break;
                }
            }
        }
        if total > 0 {
            tracing::debug!(rows = total, "pruned the delivery log");
        }
        tokio::select! {
            _ = tokio::time::sleep(prune_every(retention)) => {}
            _ = shutdown.changed() => return,
        }
    }
}
