//! What runs on the pool rather than the writer: claims (which lease), the instance's
//! heartbeat and lease renewal, retries by hand, revives, pruning in slices, and the
//! delivery log's reads.

use super::{store_err, Shared, CHANNEL};
use crate::store::{
    page, take, Attempt, AttemptRow, Candidate, Claim, ClaimSpec, DeliveryQuery, DeliveryRow,
    EventQuery, EventRow, Lane, QueueStats, RetryFilter, State, StoreError,
};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

macro_rules! claim_sql {
    ($lane:literal) => {
        concat!(
            "WITH c AS (
               SELECT d.id, d.lease_owner AS was FROM deliveries d
               WHERE d.state = 0 AND d.due_at <= $1 ",
            $lane,
            " AND (d.lease_until IS NULL OR d.lease_owner = $5
                      OR d.lease_until <= (extract(epoch FROM clock_timestamp()) * 1000)::bigint)
                 AND d.id <> ALL($4::bigint[])
                 AND d.postback_id <> ALL($2::text[])
                 AND NOT EXISTS (SELECT 1 FROM deliveries p
                                 WHERE p.order_key = d.order_key AND p.id < d.id AND p.state = 0)
               ORDER BY d.due_at, d.id
               LIMIT $3
               FOR UPDATE OF d SKIP LOCKED)
             UPDATE deliveries d SET lease_owner = $5,
                    lease_until = (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $6
             FROM c WHERE d.id = c.id
             RETURNING d.id, d.postback_id, d.offer, d.event, d.attempts, d.created_at, d.delayed,
                       CASE WHEN d.delayed AND d.attempts = 0
                            THEN (SELECT event FROM conversions WHERE key = d.conv_key) END,
                       d.orphaned_at, d.due_at, c.was"
        )
    };
}
const CLAIM_FRESH: &str = claim_sql!("AND (d.attempts > 0) = false");
const CLAIM_RETRY: &str = claim_sql!("AND (d.attempts > 0) = true");
const CLAIM_ANY: &str = claim_sql!("");

/// Claims and leases due deliveries; what was read past the caps is given back at once.
pub(super) async fn claim(
    shared: &Shared,
    specs: Vec<ClaimSpec>,
) -> Result<Vec<Claim>, StoreError> {
    let client = shared.client().await?;
    let mut out = Vec::with_capacity(specs.len());
    for spec in &specs {
        let sql = match spec.lane {
            Lane::Fresh => CLAIM_FRESH,
            Lane::Retry => CLAIM_RETRY,
            Lane::Any => CLAIM_ANY,
        };
        let st = client
            .prepare_cached(sql)
            .await
            .map_err(|e| store_err(shared, e))?;
        let mut rows = client
            .query(
                &st,
                &[
                    &spec.now,
                    &spec.blocked(),
                    &spec.scan(),
                    &*spec.held,
                    &&*shared.me,
                    &shared.lease_ms,
                ],
            )
            .await
            .map_err(|e| store_err(shared, e))?;
        rows.sort_by_key(|r| (r.get::<_, i64>(9), r.get::<_, i64>(0)));
        let candidates = rows.iter().map(|r| {
            Ok::<_, StoreError>(Candidate {
                id: r.get(0),
                postback_id: r.get(1),
                offer: r.get(2),
                event: r.get(3),
                attempts: r.get::<_, i64>(4) as u32,
                created_at: r.get(5),
                delayed: r.get(6),
                latest: r.get(7),
                orphaned_at: r.get(8),
            })
        });
        let (claim, mut left) = take(spec, candidates, true)?;
        // Rows this instance leased before the claim (fresh ones, handed to its dispatcher
        // at commit, maybe in flight already) keep their lease: given back, another
        // instance could attempt them at the same time.
        let mine_before: std::collections::HashSet<i64> = rows
            .iter()
            .filter(|r| r.get::<_, Option<&str>>(10) == Some(&*shared.me))
            .map(|r| r.get(0))
            .collect();
        left.retain(|id| !mine_before.contains(id));
        shared.lease(
            claim
                .claimed
                .iter()
                .map(|c| c.id)
                .chain(claim.unreadable.iter().copied()),
            true,
        );
        if !left.is_empty() {
            client
                .execute(
                    "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL
                     WHERE id = ANY($1) AND lease_owner = $2 AND state = 0",
                    &[&left, &&*shared.me],
                )
                .await
                .map_err(|e| store_err(shared, e))?;
        }
        out.push(claim);
    }
    Ok(out)
}

/// Renews this instance's leases, records that it is alive (registering it when `first`)
/// and counts the live instances.
pub(super) async fn heartbeat(shared: &Shared, first: bool) -> Result<usize, StoreError> {
    let client = shared.client().await?;
    let now = crate::now_ms();
    let me: &str = &shared.me;
    client
        .execute(
            "INSERT INTO instances (id, started_at, seen_at) VALUES ($1, $2, $2)
             ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
            &[&me, &now],
        )
        .await
        .map_err(|e| store_err(shared, e))?;
    let leased: Vec<i64> = shared
        .leased
        .lock()
        .map(|l| l.iter().copied().collect())
        .unwrap_or_default();
    if !first && !leased.is_empty() {
        // Rows being finished right now are skipped: they are about to lose their lease.
        client
            .execute(
                "UPDATE deliveries
                 SET lease_until = (extract(epoch FROM clock_timestamp()) * 1000)::bigint + $2
                 WHERE id IN
                   (SELECT id FROM deliveries
                    WHERE id = ANY($3) AND lease_owner = $1 AND state = 0
                    FOR UPDATE SKIP LOCKED)",
                &[&me, &shared.lease_ms, &leased],
            )
            .await
            .map_err(|e| store_err(shared, e))?;
    }
    let alive = now - 3 * shared.renew.as_millis() as i64;
    let n: i64 = client
        .query_one(
            "SELECT COUNT(*) FROM instances WHERE seen_at > $1",
            &[&alive],
        )
        .await
        .map_err(|e| store_err(shared, e))?
        .get(0);
    // Instances gone for a day are forgotten.
    let _ = client
        .execute(
            "DELETE FROM instances WHERE seen_at < $1",
            &[&(now - 86_400_000)],
        )
        .await;
    Ok(n as usize)
}

pub(super) async fn next_due(shared: &Shared, after: i64) -> Result<Option<i64>, StoreError> {
    let client = shared.client().await?;
    let st = client
        .prepare_cached(
            "SELECT LEAST(
               (SELECT MIN(due_at) FROM deliveries WHERE state = 0 AND (attempts > 0) = false AND due_at > $1),
               (SELECT MIN(due_at) FROM deliveries WHERE state = 0 AND (attempts > 0) = true AND due_at > $1))",
        )
        .await
        .map_err(|e| store_err(shared, e))?;
    let row = client
        .query_one(&st, &[&after])
        .await
        .map_err(|e| store_err(shared, e))?;
    Ok(row.get(0))
}

pub(super) async fn queue_stats(shared: &Shared) -> Result<QueueStats, StoreError> {
    let client = shared.client().await?;
    let r = client
        .query_one(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE attempts > 0), MIN(created_at),
                    COUNT(*) FILTER (WHERE orphaned_at IS NOT NULL)
             FROM deliveries WHERE state = 0",
            &[],
        )
        .await
        .map_err(|e| store_err(shared, e))?;
    Ok(QueueStats {
        pending: r.get(0),
        retries: r.get(1),
        oldest: r.get(2),
        orphaned: r.get(3),
    })
}

/// One slice of pruning; locked rows are skipped, so it never waits on the writers.
pub(super) async fn prune(shared: &Shared, before: i64, limit: usize) -> Result<usize, StoreError> {
    let client = shared.client().await?;
    let limit = limit as i64;
    let deliveries = client
        .query(
            "WITH d AS (SELECT id FROM deliveries WHERE state IN (2, 3, 4) AND updated_at < $1
                        LIMIT $2 FOR UPDATE SKIP LOCKED),
                  a AS (DELETE FROM attempts WHERE delivery_id IN (SELECT id FROM d))
             DELETE FROM deliveries WHERE id IN (SELECT id FROM d) RETURNING id",
            &[&before, &limit],
        )
        .await
        .map_err(|e| store_err(shared, e))?
        .len();
    // An event stays while a delivery it made is kept: the log finds deliveries by it. The
    // conversions of the events that go are looked at: one last touched before `before`
    // with no unfinished delivery goes too (its `sent` list is the dedupe, so it stays
    // while any delivery is pending; and a pending delivery keeps its event, so the
    // conversion is looked at again when that event goes).
    let row = client
        .query_one(
            "WITH gone AS (
               DELETE FROM events WHERE id IN
                 (SELECT id FROM events e WHERE received_at < $1
                    AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id)
                  LIMIT $2 FOR UPDATE SKIP LOCKED)
               RETURNING conv_key),
             conv AS (
               DELETE FROM conversions c
               WHERE c.key IN (SELECT conv_key FROM gone WHERE conv_key IS NOT NULL)
                 AND c.updated_at < $1
                 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.state = 0 AND d.conv_key = c.key)
               RETURNING 1)
             SELECT (SELECT COUNT(*) FROM gone), (SELECT COUNT(*) FROM conv)",
            &[&before, &limit],
        )
        .await
        .map_err(|e| store_err(shared, e))?;
    let (events, conversions): (i64, i64) = (row.get(0), row.get(1));
    // Refused webhooks: past retention, and beyond the newest REFUSED_KEPT.
    let refused = client
        .execute(
            "DELETE FROM refused WHERE id IN
               (SELECT id FROM refused WHERE at < $1
                   OR id <= (SELECT id FROM refused ORDER BY id DESC LIMIT 1 OFFSET $3)
                LIMIT $2)",
            &[&before, &limit, &crate::store::REFUSED_KEPT],
        )
        .await
        .map_err(|e| store_err(shared, e))?;
    Ok(deliveries
        .max(events as usize)
        .max(conversions as usize)
        .max(refused as usize))
}

/// How many deliveries each postback made since `since`, by state (see
/// [`crate::store::Backend::made_since`]).
pub(super) async fn made_since(
    shared: &Shared,
    since: i64,
) -> Result<Vec<(String, State, i64)>, StoreError> {
    let client = shared.client().await?;
    let err = |e| store_err(shared, e);
    let row = client
        .query_one("SELECT MIN(id), MAX(id) FROM deliveries", &[])
        .await
        .map_err(err)?;
    let (Some(mut lo), Some(mut hi)) = (row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1))
    else {
        return Ok(Vec::new());
    };
    let probe = client
        .prepare_cached("SELECT id, created_at FROM deliveries WHERE id >= $1 ORDER BY id LIMIT 1")
        .await
        .map_err(err)?;
    hi += 1;
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let found = client.query_opt(&probe, &[&mid]).await.map_err(err)?;
        match found.map(|r| r.get::<_, i64>(1)) {
            Some(at) if at < since => lo = mid + 1,
            _ => hi = mid,
        }
    }
    Ok(client
        .query(
            "SELECT postback_id, state, COUNT(*) FROM deliveries WHERE id >= $1
             GROUP BY postback_id, state",
            &[&lo],
        )
        .await
        .map_err(err)?
        .iter()
        .map(|r| (r.get(0), State::from_code(r.get(1)), r.get(2)))
        .collect())
}

pub(super) async fn refuse(shared: &Shared, r: crate::store::Refused) -> Result<(), StoreError> {
    let client = shared.client().await?;
    client
        .execute(
            "INSERT INTO refused (at, source, reason, status, message, method, target, client)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &r.at,
                &r.source,
                &r.reason,
                &i64::from(r.status),
                &r.message,
                &r.method,
                &r.target,
                &r.client,
            ],
        )
        .await
        .map_err(|e| store_err(shared, e))?;
    Ok(())
}

pub(super) async fn refused(
    shared: &Shared,
    before_id: Option<i64>,
    limit: usize,
) -> Result<(Vec<crate::store::Refused>, Option<i64>), StoreError> {
    let limit = limit.clamp(1, 1000);
    let client = shared.client().await?;
    let rows = client
        .query(
            "SELECT id, at, source, reason, status, message, method, target, client
             FROM refused WHERE ($1::bigint IS NULL OR id < $1) ORDER BY id DESC LIMIT $2",
            &[&before_id, &((limit + 1) as i64)],
        )
        .await
        .map_err(|e| store_err(shared, e))?
        .iter()
        .map(|r| crate::store::Refused {
            id: r.get(0),
            at: r.get(1),
            source: r.get(2),
            reason: r.get(3),
            status: r.get::<_, i64>(4) as u16,
            message: r.get(5),
            method: r.get(6),
            target: r.get(7),
            client: r.get(8),
        })
        .collect();
    Ok(page(rows, limit, |r| r.id))
}

pub(super) async fn revive(
    shared: &Shared,
    postbacks: Vec<String>,
    now: i64,
) -> Result<usize, StoreError> {
    let mut client = shared.client().await?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| store_err(shared, e))?;
    let n = tx
        .execute(
            "UPDATE deliveries SET due_at = $2
             WHERE state = 0 AND orphaned_at IS NOT NULL AND due_at > $2 AND postback_id = ANY($1)",
            &[&postbacks, &now],
        )
        .await
        .map_err(|e| store_err(shared, e))?;
    if n > 0 {
        tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL])
            .await
            .map_err(|e| store_err(shared, e))?;
    }
    tx.commit().await.map_err(|e| store_err(shared, e))?;
    Ok(n as usize)
}

pub(super) async fn retry(
    shared: &Shared,
    f: RetryFilter,
    now: i64,
) -> Result<Vec<i64>, StoreError> {
    let Some(state) = f.finished_state() else {
        return Ok(Vec::new());
    };
    let mut client = shared.client().await?;
    let tx = client
        .transaction()
        .await
        .map_err(|e| store_err(shared, e))?;
    let ids: Vec<i64> = tx
        .query(
            "UPDATE deliveries SET state = 0, due_at = $6, updated_at = $6,
                    last_error = 'queued again by hand', lease_owner = NULL, lease_until = NULL
             WHERE state IN (2, 3, 4)
               AND ($1::bigint IS NULL OR id = $1)
               AND ($1::bigint IS NOT NULL OR state = $2)
               AND ($3::text IS NULL OR postback_id = $3)
               AND ($4::bigint IS NULL OR created_at >= $4)
               AND ($5::bigint IS NULL OR created_at < $5)
             RETURNING id",
            &[&f.id, &state.code(), &f.postback, &f.since, &f.until, &now],
        )
        .await
        .map_err(|e| store_err(shared, e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !ids.is_empty() {
        tx.execute("SELECT pg_notify($1, '')", &[&CHANNEL])
            .await
            .map_err(|e| store_err(shared, e))?;
    }
    tx.commit().await.map_err(|e| store_err(shared, e))?;
    let mut ids = ids;
    ids.sort_unstable();
    Ok(ids)
}

const DELIVERY_COLUMNS: &str =
    "id, postback_id, offer, event_id, state, status, attempts, created_at, due_at,
    updated_at, last_status, last_error, clickid, transaction_id, offer_id, affiliate_id, goal,
    last_outcome, orphaned_at";

fn delivery_row(r: &Row) -> DeliveryRow {
    DeliveryRow {
        id: r.get(0),
        postback: r.get(1),
        offer: r.get(2),
        event_id: r.get(3),
        state: State::from_code(r.get(4)),
        status: r.get(5),
        attempts: r.get::<_, i64>(6) as u32,
        created_at: r.get(7),
        due_at: r.get(8),
        updated_at: r.get(9),
        last_status: r.get::<_, Option<i64>>(10).map(|s| s as u16),
        last_error: r.get(11),
        clickid: r.get(12),
        transaction_id: r.get(13),
        offer_id: r.get(14),
        affiliate_id: r.get(15),
        goal: r.get(16),
        last_outcome: r.get(17),
        orphaned_at: r.get(18),
        attempt_log: Vec::new(),
    }
}

pub(super) async fn delivery(
    shared: &Shared,
    id: i64,
    postbacks: Option<Vec<String>>,
) -> Result<Option<DeliveryRow>, StoreError> {
    let client = shared.client().await?;
    let row = client
        .query_opt(
            &format!(
                "SELECT {DELIVERY_COLUMNS} FROM deliveries
                 WHERE id = $1 AND ($2::text[] IS NULL OR postback_id = ANY($2))"
            ),
            &[&id, &postbacks],
        )
        .await
        .map_err(|e| store_err(shared, e))?;
    let Some(row) = row else {
        return Ok(None);
    };
    let mut row = delivery_row(&row);
    row.attempt_log = client
        .query(
            "SELECT attempt, started_at, duration_ms, method, url, request_body, response_status,
                    response_body, error, outcome, config_version, config_commit
             FROM attempts WHERE delivery_id = $1 ORDER BY attempt, id",
            &[&id],
        )
        .await
        .map_err(|e| store_err(shared, e))?
        .iter()
        .map(|r| AttemptRow {
            attempt: r.get::<_, i64>(0) as u32,
            recorded: Attempt {
                started_at: r.get(1),
                duration_ms: r.get(2),
                method: r.get(3),
                url: r.get(4),
                request_body: r.get(5),
                response_status: r.get::<_, Option<i64>>(6).map(|s| s as u16),
                response_body: r.get(7),
                error: r.get(8),
                outcome: r.get(9),
                config_version: r.get(10),
                config_commit: r.get(11),
            },
        })
        .collect();
    Ok(Some(row))
}

/// A query's `WHERE` clauses and their parameters, numbered as they are added.
#[derive(Default)]
struct Filter {
    sql: String,
    args: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Filter {
    /// `clause` holds one `?`, which becomes this value's parameter.
    fn add<T: ToSql + Sync + Send + 'static>(&mut self, clause: &str, v: Option<T>) {
        if let Some(v) = v {
            self.args.push(Box::new(v));
            self.sql.push_str(" AND ");
            self.sql
                .push_str(&clause.replace('?', &format!("${}", self.args.len())));
        }
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

pub(super) async fn deliveries(
    shared: &Shared,
    q: DeliveryQuery,
) -> Result<(Vec<DeliveryRow>, Option<i64>), StoreError> {
    let mut f = Filter::default();
    f.add("offer_id = ?", q.offer);
    f.add("affiliate_id = ?", q.affiliate);
    f.add("goal = ?", q.goal);
    f.add("status = ?", q.status);
    f.add("last_outcome = ?", q.outcome);
    f.add(
        "event_id IN (SELECT id FROM events WHERE transaction_id = ?)",
        q.transaction_id,
    );
    f.add(
        "event_id IN (SELECT id FROM events WHERE clickid = ?)",
        q.clickid,
    );
    f.add(
        "event_id IN (SELECT id FROM events WHERE transaction_id = ? OR clickid = ?)",
        q.id,
    );
    f.add("postback_id = ANY(?)", q.postbacks);
    f.add("state = ?", q.state.map(State::code));
    f.add("created_at >= ?", q.since);
    f.add("created_at < ?", q.until);
    f.add("id < ?", q.before_id);
    let limit = q.limit.clamp(1, 1000);
    let sql = format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE true{} ORDER BY id DESC LIMIT {}",
        f.sql,
        limit + 1
    );
    let client = shared.client().await?;
    let rows = client
        .query(&sql, &f.params())
        .await
        .map_err(|e| store_err(shared, e))?
        .iter()
        .map(delivery_row)
        .collect();
    Ok(page(rows, limit, |r| r.id))
}

pub(super) async fn events(
    shared: &Shared,
    q: EventQuery,
) -> Result<(Vec<EventRow>, Option<i64>), StoreError> {
    let mut f = Filter::default();
    f.add("source = ?", q.source);
    f.add("kind = ?", q.kind);
    f.add("clickid = ?", q.clickid);
    f.add("transaction_id = ?", q.transaction_id);
    f.add("(transaction_id = ? OR clickid = ?)", q.id);
    f.add("offer_id = ?", q.offer);
    f.add("affiliate_id = ?", q.affiliate);
    f.add("received_at >= ?", q.since);
    f.add("received_at < ?", q.until);
    f.add("seq < ?", q.before_rowid);
    let limit = q.limit.clamp(1, 1000);
    let sql = format!(
        "SELECT seq, id, received_at, source, kind, clickid, transaction_id, offer_id,
                affiliate_id, event, matched FROM events WHERE true{} ORDER BY seq DESC LIMIT {}",
        f.sql,
        limit + 1
    );
    let client = shared.client().await?;
    let rows: Vec<(i64, EventRow)> = client
        .query(&sql, &f.params())
        .await
        .map_err(|e| store_err(shared, e))?
        .iter()
        .map(|r| {
            let event: String = r.get(9);
            let matched: String = r.get(10);
            (
                r.get(0),
                EventRow {
                    id: r.get(1),
                    received_at: r.get(2),
                    source: r.get(3),
                    kind: r.get(4),
                    clickid: r.get(5),
                    transaction_id: r.get(6),
                    offer_id: r.get(7),
                    affiliate_id: r.get(8),
                    event: serde_json::from_str(&event).unwrap_or_default(),
                    matched: serde_json::from_str(&matched).unwrap_or_default(),
                },
            )
        })
        .collect();
    let (rows, next) = page(rows, limit, |r| r.0);
    Ok((rows.into_iter().map(|r| r.1).collect(), next))
}
