//! The store's tables, created or upgraded at open. `PRAGMA user_version` is the schema
//! version.

use rusqlite::Connection;

const V1: &str = "
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY,
    received_at INTEGER NOT NULL,
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
CREATE INDEX IF NOT EXISTS events_received ON events(received_at);
CREATE INDEX IF NOT EXISTS events_conv ON events(conv_key);

-- The latest merged state of each conversion, keyed by source and transaction (or click).
CREATE TABLE IF NOT EXISTS conversions (
    key TEXT PRIMARY KEY,
    status TEXT,
    event TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);

-- state: 0 pending, 1 in flight, 2 delivered, 3 dead, 4 cancelled.
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    postback_id TEXT NOT NULL,
    offer TEXT NOT NULL,
    conv_key TEXT,
    order_key TEXT NOT NULL,
    dedupe_key TEXT UNIQUE,
    status TEXT,
    event TEXT NOT NULL,
    state INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    due_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    delayed INTEGER NOT NULL DEFAULT 0,
    last_status INTEGER,
    last_error TEXT,
    clickid TEXT,
    transaction_id TEXT,
    offer_id TEXT,
    affiliate_id TEXT,
    goal TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, due_at);
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries(order_key, id);
CREATE INDEX IF NOT EXISTS deliveries_postback ON deliveries(postback_id, created_at);

CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    method TEXT NOT NULL,
    url TEXT NOT NULL,
    request_body TEXT,
    response_status INTEGER,
    response_body TEXT,
    error TEXT,
    outcome TEXT NOT NULL,
    config_version TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_delivery ON attempts(delivery_id, attempt);
";

/// Pruning by age, and the row the writer rewrites to prove the disk takes writes again.
const V2: &str = "
CREATE INDEX IF NOT EXISTS deliveries_finished ON deliveries(state, updated_at);
CREATE INDEX IF NOT EXISTS conversions_updated ON conversions(updated_at);
CREATE TABLE IF NOT EXISTS heartbeat (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at INTEGER NOT NULL
);
";

/// Claims look at first attempts and retries apart; this keeps either lane's claim from
/// scanning the other's due rows.
const V3: &str = "
CREATE INDEX IF NOT EXISTS deliveries_lane ON deliveries(state, (attempts > 0), due_at);
";

/// The delivery log's search: the last attempt's result class, and lookups by the ids an
/// affiliate manager asks about.
const V4: &str = "
ALTER TABLE deliveries ADD COLUMN last_outcome TEXT;
CREATE INDEX IF NOT EXISTS deliveries_txid ON deliveries(transaction_id);
CREATE INDEX IF NOT EXISTS deliveries_clickid ON deliveries(clickid);
CREATE INDEX IF NOT EXISTS events_txid ON events(transaction_id);
CREATE INDEX IF NOT EXISTS events_clickid ON events(clickid);
";

/// Nothing reads events by conversion key (conversions are looked up in their own table);
/// the index cost a random b-tree insert per event.
const V5: &str = "
DROP INDEX IF EXISTS events_conv;
";

/// Fewer and smaller indexes on deliveries. Every index a commit touches is at least one
/// page written to the log, whatever the batch size; six indexes were kept up to date on
/// each insert and three more moved on each state change.
/// - Pending deliveries (state 0; 1 is no longer written) are in `deliveries_pending`, by
///   lane and due time, and in `deliveries_order`; they leave both when they finish, so
///   these stay as small as the queue.
/// - Finished ones are in `deliveries_done`, by finish time, for pruning.
/// - The log's search by transaction or click id goes through the event that made the
///   delivery (`deliveries_event`), as the event row carries the same merged ids.
const V6: &str = "
DROP INDEX IF EXISTS deliveries_due;
DROP INDEX IF EXISTS deliveries_lane;
DROP INDEX IF EXISTS deliveries_finished;
DROP INDEX IF EXISTS deliveries_order;
DROP INDEX IF EXISTS deliveries_txid;
DROP INDEX IF EXISTS deliveries_clickid;
UPDATE deliveries SET state = 0 WHERE state = 1;
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries((attempts > 0), due_at) WHERE state = 0;
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries(order_key, id) WHERE state = 0;
CREATE INDEX IF NOT EXISTS deliveries_done ON deliveries(updated_at) WHERE state IN (2, 3, 4);
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries(event_id);
";

/// Which (postback, offer, status) a conversion has queued is kept on its row, as a JSON
/// list of `postback|offer|status`, instead of in the unique `dedupe_key` index of
/// deliveries: the row is rewritten by every event of the conversion anyway, while the
/// index cost a write of a random page per delivery. New deliveries leave `dedupe_key`
/// empty; the lists start from the keys already there.
const V7: &str = "
ALTER TABLE conversions ADD COLUMN sent TEXT;
UPDATE conversions SET sent = s.j
  FROM (SELECT conv_key, json_group_array(substr(dedupe_key, length(conv_key) + 2)) AS j
        FROM deliveries
        WHERE dedupe_key IS NOT NULL AND conv_key IS NOT NULL
        GROUP BY conv_key) AS s
  WHERE s.conv_key = conversions.key;
";

/// A delivery whose postback left the config waits for it (`orphaned_at`: since when it was
/// found missing). The partial index holds only those, for waking them when a reload
/// brings their postback back.
const V8: &str = "
ALTER TABLE deliveries ADD COLUMN orphaned_at INTEGER;
CREATE INDEX IF NOT EXISTS deliveries_orphaned ON deliveries(postback_id)
    WHERE state = 0 AND orphaned_at IS NOT NULL;
";

/// The commit the rules were at when an attempt was made, beside the config version.
const V9: &str = "
ALTER TABLE attempts ADD COLUMN config_commit TEXT;
";

/// Refused webhooks, for the incoming log: bounded in rate where they are recorded and in
/// number by pruning.
const V10: &str = "
CREATE TABLE IF NOT EXISTS refused (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    source TEXT NOT NULL,
    reason TEXT NOT NULL,
    status INTEGER NOT NULL,
    message TEXT NOT NULL,
    method TEXT NOT NULL,
    target TEXT NOT NULL,
    client TEXT
);
CREATE INDEX IF NOT EXISTS refused_at ON refused(at);
";

/// The search by transaction or click id moves from two indexes every commit kept up to
/// date (a random page each per webhook) to `event_ids`, brought up to date in sorted runs
/// behind the hot path (`sqlite/ids.rs`). It starts empty with its mark at 0: the indexer
/// catches up on the events already there, and searches scan what it has not reached.
const V11: &str = "
DROP INDEX IF EXISTS events_txid;
DROP INDEX IF EXISTS events_clickid;
CREATE TABLE IF NOT EXISTS event_ids (
    h INTEGER NOT NULL,
    event INTEGER NOT NULL,
    PRIMARY KEY (h, event)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS event_ids_upto (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    upto INTEGER NOT NULL
);
INSERT OR IGNORE INTO event_ids_upto (one, upto) VALUES (1, 0);
";

/// The migrations in order: the store at version N has run the first N.
const MIGRATIONS: [&str; 11] = [V1, V2, V3, V4, V5, V6, V7, V8, V9, V10, V11];

pub fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (done, sql) in (1_i64..).zip(MIGRATIONS) {
        if version < done {
            conn.execute_batch(sql)?;
            conn.pragma_update(None, "user_version", done)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store from before V7 keeps its conversions' dedupe: each conversion's row lists
    /// what its deliveries' keys said it had queued.
    #[test]
    fn v7_moves_dedupe_keys_onto_conversions() {
        let conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..6] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 6).unwrap();
        conn.execute_batch(
            "INSERT INTO conversions (key, status, event, updated_at)
                VALUES ('web|t|T1', 'approved', '{}', 1), ('web|t|T2', 'pending', '{}', 1);
             INSERT INTO deliveries (event_id, postback_id, offer, conv_key, order_key, dedupe_key,
                                     event, state, attempts, created_at, due_at, updated_at)
             VALUES ('e1', 'pb', '7', 'web|t|T1', 'web|t|T1|pb|7', 'web|t|T1|pb|7|pending', '{}', 2, 1, 1, 1, 1),
                    ('e2', 'pb', '7', 'web|t|T1', 'web|t|T1|pb|7', 'web|t|T1|pb|7|approved', '{}', 0, 0, 1, 1, 1),
                    ('e3', 'pb', '7', NULL, 'e3|pb|7', NULL, '{}', 2, 1, 1, 1, 1);",
        )
        .unwrap();
        migrate(&conn).unwrap();
        let sent = |key: &str| -> Option<Vec<String>> {
            conn.query_row("SELECT sent FROM conversions WHERE key = ?1", [key], |r| {
                r.get::<_, Option<String>>(0)
            })
            .unwrap()
            .map(|s| serde_json::from_str(&s).unwrap())
        };
        let mut t1 = sent("web|t|T1").unwrap();
        t1.sort();
        assert_eq!(t1, ["pb|7|approved", "pb|7|pending"]);
        assert_eq!(sent("web|t|T2"), None);
    }

    /// Every hot statement reaches deliveries through an index: a full scan of the table
    /// would cost a second per call with a million queued.
    #[test]
    fn hot_statements_use_an_index() {
        let conn = Connection::open_in_memory().unwrap();
        migrate(&conn).unwrap();
        for sql in super::super::ops::INDEXED {
            let mut st = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
            let nulls = vec![rusqlite::types::Null; st.parameter_count()];
            let plan: Vec<String> = st
                .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            for step in &plan {
                let scans_table = step.starts_with("SCAN ")
                    && !step.contains(" USING ")
                    && !step.contains("CONSTANT ROW")
                    && !step.contains("json_each");
                assert!(!scans_table, "full scan in {sql}:\n{}", plan.join("\n"));
            }
        }
    }
}
