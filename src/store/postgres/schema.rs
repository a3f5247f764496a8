//! The PostgreSQL tables, created or upgraded at open under an advisory lock, so instances
//! starting together migrate once. `postbackd_schema.version` is the schema version.
//!
//! The tables mirror the embedded store's, with what sharing them needs: a `lease` on each
//! claimed delivery (`lease_owner`, `lease_until`), a unique `dedupe_key`, and `instances`
//! for the live fleet.

use tokio_postgres::Client;

const V1: &str = "
CREATE TABLE events (
    seq BIGSERIAL UNIQUE,
    id TEXT PRIMARY KEY,
    received_at BIGINT NOT NULL,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    conv_key TEXT,
    clickid TEXT,
    transaction_id TEXT,
    offer_id TEXT,
    affiliate_id TEXT,
    event TEXT NOT NULL,
    matched TEXT NOT NULL
);
CREATE INDEX events_received ON events (received_at);
CREATE INDEX events_txid ON events (transaction_id);
CREATE INDEX events_clickid ON events (clickid);

-- The latest merged state of each conversion and the `postback|offer|status` it queued.
-- A row with a NULL event was just created to be locked: the conversion starts here.
CREATE TABLE conversions (
    key TEXT PRIMARY KEY,
    status TEXT,
    event TEXT,
    updated_at BIGINT NOT NULL,
    sent TEXT
);
CREATE INDEX conversions_updated ON conversions (updated_at);

-- state: 0 pending, 2 delivered, 3 dead, 4 cancelled. A pending delivery with a lease in
-- the future is being attempted by `lease_owner`.
CREATE TABLE deliveries (
    id BIGSERIAL PRIMARY KEY,
    event_id TEXT NOT NULL,
    postback_id TEXT NOT NULL,
    offer TEXT NOT NULL,
    conv_key TEXT,
    order_key TEXT NOT NULL,
    dedupe_key TEXT,
    status TEXT,
    event TEXT NOT NULL,
    state BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    due_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    delayed BOOLEAN NOT NULL,
    last_status BIGINT,
    last_error TEXT,
    last_outcome TEXT,
    clickid TEXT,
    transaction_id TEXT,
    offer_id TEXT,
    affiliate_id TEXT,
    goal TEXT,
    orphaned_at BIGINT,
    lease_owner TEXT,
    lease_until BIGINT
);
CREATE UNIQUE INDEX deliveries_dedupe ON deliveries (dedupe_key);
CREATE INDEX deliveries_pending ON deliveries ((attempts > 0), due_at, id) WHERE state = 0;
CREATE INDEX deliveries_order ON deliveries (order_key, id) WHERE state = 0;
CREATE INDEX deliveries_conv ON deliveries (conv_key) WHERE state = 0;
CREATE INDEX deliveries_done ON deliveries (updated_at) WHERE state IN (2, 3, 4);
CREATE INDEX deliveries_event ON deliveries (event_id);
CREATE INDEX deliveries_orphaned ON deliveries (postback_id) WHERE state = 0 AND orphaned_at IS NOT NULL;
CREATE INDEX deliveries_leased ON deliveries (lease_owner) WHERE lease_owner IS NOT NULL;

CREATE TABLE attempts (
    id BIGSERIAL PRIMARY KEY,
    delivery_id BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    started_at BIGINT NOT NULL,
    duration_ms BIGINT NOT NULL,
    method TEXT NOT NULL,
    url TEXT NOT NULL,
    request_body TEXT,
    response_status BIGINT,
    response_body TEXT,
    error TEXT,
    outcome TEXT NOT NULL,
    config_version TEXT NOT NULL,
    config_commit TEXT
);
CREATE INDEX attempts_delivery ON attempts (delivery_id, attempt);

-- The instances sharing the database, each seen every few seconds.
CREATE TABLE instances (
    id TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    seen_at BIGINT NOT NULL
);
";

/// Fewer index entries per webhook, measured as the bound on throughput (BENCHMARKS.md):
/// - leases are renewed by the ids each instance holds, so the lease needs no index, and a
///   claim's update of the lease alone can stay on its page (HOT);
/// - conversions are pruned through the events being pruned (a conversion's last event is
///   kept while any of its deliveries is), so `updated_at` needs no index and a
///   conversion's update can stay on its page too, with room left on each page for it.
const V2: &str = "
DROP INDEX IF EXISTS deliveries_leased;
DROP INDEX IF EXISTS conversions_updated;
ALTER TABLE conversions SET (fillfactor = 70);
ALTER TABLE deliveries SET (fillfactor = 80);
";

/// Refused webhooks, for the incoming log: bounded in rate where they are recorded and in
/// number by pruning.
const V3: &str = "
CREATE TABLE refused (
    id BIGSERIAL PRIMARY KEY,
    at BIGINT NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    status BIGINT NOT NULL,
    message TEXT NOT NULL,
    method TEXT NOT NULL,
    target TEXT NOT NULL,
    client TEXT
);
CREATE INDEX refused_at ON refused (at);
";

/// The migrations in order: a database at version N has run the first N.
const MIGRATIONS: [&str; 3] = [V1, V2, V3];

/// Any number; instances that start together take it in turn.
const MIGRATION_LOCK: i64 = 0x706f_7374_6264;

pub async fn migrate(client: &mut Client) -> Result<i64, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS postbackd_schema (version BIGINT NOT NULL)")
        .await?;
    let version: i64 = tx
        .query_opt("SELECT version FROM postbackd_schema", &[])
        .await?
        .map(|r| r.get(0))
        .unwrap_or(0);
    let mut now = version;
    for (done, sql) in (1_i64..).zip(MIGRATIONS) {
        if version < done {
            tx.batch_execute(sql).await?;
            now = done;
        }
    }
    if now != version {
        tx.execute("DELETE FROM postbackd_schema", &[]).await?;
        tx.execute(
            "INSERT INTO postbackd_schema (version) VALUES ($1)",
            &[&now],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(now)
}
