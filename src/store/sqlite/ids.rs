//! The log's search by transaction or click id, indexed behind the hot path.
//!
//! Trackers' ids are random, so an index kept up to date by every commit costs one random
//! page per id per webhook, written twice (to the log, then at checkpoint): the two id
//! indexes were more than half of what a webhook wrote (BENCHMARKS.md). Instead, events are
//! appended in rowid order, and `event_ids` (a 64-bit hash of each id and the event's
//! rowid) is brought up to date in sorted runs of many events, off the ingest path: a run
//! of a few thousand sorted keys shares its pages, where single inserts each dirtied one.
//!
//! `event_ids_upto` says up to which event rowid `event_ids` is complete. A search reads the
//! index up to there and scans the few events after it (the tail), so a search finds an
//! event the moment it is committed, as before. Rowids only grow: an event is inserted
//! past both the largest rowid and `upto`, so pruning every event never makes a rowid come
//! back below the mark.
//!
//! The hash only narrows the search: every query also compares the id itself.

use super::writer::{job, Job};
use rusqlite::{params, Connection};
use sha2::Digest;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// Events indexed per writer job: a run this long shares most of its pages yet keeps the
/// writer busy for only a few milliseconds.
pub(super) const RUN: i64 = 4096;
/// The indexer catches up once this many events wait, or every [`EVERY`].
const TAIL: i64 = 16 * 1024;
const EVERY: Duration = Duration::from_secs(5);
/// How often the indexer looks at the tail.
const LOOK: Duration = Duration::from_millis(250);

/// The key an id is indexed by.
pub(super) fn hash(id: &str) -> i64 {
    let d = sha2::Sha256::digest(id.as_bytes());
    i64::from_le_bytes(d[..8].try_into().unwrap_or_default())
}

/// The rowid a new event takes: past every event and past the indexed mark.
pub(super) const NEXT_ROWID: &str = "max(coalesce((SELECT max(rowid) FROM events), 0),
                                        (SELECT upto FROM event_ids_upto)) + 1";

/// A condition on `events` (as `e`): the event's `column` is `?n` (one of `clickid`,
/// `transaction_id`, or both with `OR`), through the index and the tail.
pub(super) fn matches(columns: &[&str], n: usize) -> String {
    let on = |alias: &str| {
        columns
            .iter()
            .map(|c| format!("{alias}.{c} = ?{n}"))
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    let (cond, tail) = (on("e"), on("t"));
    format!(
        "e.rowid IN (SELECT event FROM event_ids WHERE h = hash_id(?{n})
                     UNION ALL
                     SELECT t.rowid FROM events t
                     WHERE t.rowid > (SELECT upto FROM event_ids_upto) AND ({tail}))
         AND ({cond})"
    )
}

/// Registers `hash_id(text)` on a connection, for [`matches`].
pub(super) fn register(c: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    c.create_scalar_function(
        "hash_id",
        1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| Ok(ctx.get::<Option<String>>(0)?.map(|s| hash(&s))),
    )
}

/// Indexes up to `limit` events past the mark, in key order, and moves the mark. Returns
/// how many events it covered.
pub(super) fn catch_up(c: &Connection, limit: i64) -> rusqlite::Result<i64> {
    let upto: i64 = c
        .prepare_cached("SELECT upto FROM event_ids_upto")?
        .query_row([], |r| r.get(0))?;
    let top: i64 = c
        .prepare_cached("SELECT coalesce(max(rowid), 0) FROM events")?
        .query_row([], |r| r.get(0))?;
    let end = top.min(upto + limit);
    if end <= upto {
        return Ok(0);
    }
    let mut keys: Vec<(i64, i64)> = Vec::new();
    {
        let mut st = c.prepare_cached(
            "SELECT rowid, transaction_id, clickid FROM events WHERE rowid > ?1 AND rowid <= ?2",
        )?;
        let mut rows = st.query(params![upto, end])?;
        while let Some(r) = rows.next()? {
            let rowid: i64 = r.get(0)?;
            for i in [1, 2] {
                if let Some(id) = r.get_ref(i)?.as_str_or_null()? {
                    keys.push((hash(id), rowid));
                }
            }
        }
    }
    keys.sort_unstable();
    keys.dedup();
    let mut ins = c.prepare_cached("INSERT OR IGNORE INTO event_ids (h, event) VALUES (?1, ?2)")?;
    for (h, rowid) in &keys {
        ins.execute(params![h, rowid])?;
    }
    c.prepare_cached("UPDATE event_ids_upto SET upto = ?1")?
        .execute([end])?;
    Ok(end - upto)
}

/// Removes the index entries of events about to be deleted: (rowid, transaction id, click
/// id) each.
pub(super) fn forget(c: &Connection, events: &[Pruned]) -> rusqlite::Result<()> {
    let mut del = c.prepare_cached("DELETE FROM event_ids WHERE h = ?1 AND event = ?2")?;
    for (rowid, tx, click) in events {
        for id in [tx, click].into_iter().flatten() {
            del.execute(params![hash(id), rowid])?;
        }
    }
    Ok(())
}

/// An event pruning deletes: its rowid, transaction id and click id.
pub(super) type Pruned = (i64, Option<String>, Option<String>);

/// Runs the indexer until the writer goes away: once enough events wait (or every few
/// seconds), it sends the writer runs of [`RUN`] events until the tail is short. Its
/// commits are not synced: what it writes can always be written again from the events.
/// It stops once `alive` is gone (the store was dropped).
pub(super) fn spawn(
    tx: mpsc::Sender<Job>,
    reader: Arc<Mutex<Connection>>,
    alive: std::sync::Weak<()>,
) {
    let run = move || {
        let mut last = Instant::now();
        loop {
            std::thread::sleep(LOOK);
            if alive.strong_count() == 0 {
                return;
            }
            let tail = {
                let c = reader.lock().unwrap_or_else(|e| e.into_inner());
                c.query_row(
                    &format!("SELECT {NEXT_ROWID} - 1 - (SELECT upto FROM event_ids_upto)"),
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .unwrap_or(0)
            };
            if tail <= 0 || (tail < TAIL && last.elapsed() < EVERY) {
                continue;
            }
            last = Instant::now();
            loop {
                let (reply, rx) = tokio::sync::oneshot::channel();
                if tx
                    .send(job(|c| catch_up(c, RUN), |_| {}, reply, false))
                    .is_err()
                {
                    return;
                }
                match rx.blocking_recv() {
                    Ok(Ok(n)) if n == RUN => continue,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "the id index could not catch up; will try again");
                        break;
                    }
                    Err(_) => return,
                    Ok(Ok(_)) => break,
                }
            }
        }
    };
    let _ = std::thread::Builder::new()
        .name("store-indexer".into())
        .spawn(run);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        super::super::schema::migrate(&c).unwrap();
        register(&c).unwrap();
        c
    }

    fn add(c: &Connection, id: &str, tx: Option<&str>, click: Option<&str>) -> i64 {
        c.execute(
            &format!(
                "INSERT INTO events (rowid, id, received_at, source, kind, clickid, transaction_id,
                                     event, matched)
                 VALUES ({NEXT_ROWID}, ?1, 1, 'web', 'conversion', ?2, ?3, '{{}}', '[]')"
            ),
            params![id, click, tx],
        )
        .unwrap();
        c.last_insert_rowid()
    }

    fn find(c: &Connection, columns: &[&str], v: &str) -> Vec<String> {
        let sql = format!(
            "SELECT e.id FROM events e WHERE {} ORDER BY e.rowid",
            matches(columns, 1)
        );
        c.prepare(&sql)
            .unwrap()
            .query_map([v], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// An event is found by either id whether the index has reached it or not, and only by
    /// the column asked for; runs stop at their limit and move the mark.
    #[test]
    fn finds_events_before_and_after_the_mark() {
        let c = store();
        add(&c, "a", Some("T1"), Some("C1"));
        add(&c, "b", Some("T2"), Some("T1"));
        add(&c, "c", None, Some("C3"));
        let both = ["transaction_id", "clickid"];
        let check = || {
            assert_eq!(find(&c, &["transaction_id"], "T1"), ["a"]);
            assert_eq!(find(&c, &["clickid"], "T1"), ["b"]);
            assert_eq!(find(&c, &both, "T1"), ["a", "b"]);
            assert_eq!(find(&c, &both, "C3"), ["c"]);
            assert!(find(&c, &both, "nope").is_empty());
        };
        // All in the tail, then all indexed.
        check();
        assert_eq!(catch_up(&c, 2).unwrap(), 2);
        assert_eq!(catch_up(&c, 2).unwrap(), 1);
        assert_eq!(catch_up(&c, 2).unwrap(), 0);
        check();
        // The index alone finds them: with the mark past them, the tail is empty.
        let mut st = c
            .prepare(&format!(
                "SELECT count(*) FROM events e WHERE {}",
                matches(&both, 1)
            ))
            .unwrap();
        let plan: Vec<String> = c
            .prepare(&format!(
                "EXPLAIN QUERY PLAN SELECT e.id FROM events e WHERE {}",
                matches(&both, 1)
            ))
            .unwrap()
            .query_map(["T1"], |r| r.get(3))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            plan.iter()
                .all(|s| !["SCAN e", "SCAN t"].contains(&s.as_str())),
            "{plan:?}"
        );
        assert_eq!(st.query_row(["T1"], |r| r.get::<_, i64>(0)).unwrap(), 2);
        let entries: i64 = c
            .query_row("SELECT count(*) FROM event_ids", [], |r| r.get(0))
            .unwrap();
        assert_eq!(entries, 5);
        // Half indexed, half not: both halves are found.
        add(&c, "d", Some("T1"), None);
        assert_eq!(find(&c, &["transaction_id"], "T1"), ["a", "d"]);
    }

    /// Forgetting an event removes its entries; when every event is gone, new ones still
    /// take rowids past the mark, so the indexer never skips them.
    #[test]
    fn rowids_stay_past_the_mark_after_pruning_everything() {
        let c = store();
        let r1 = add(&c, "a", Some("T1"), Some("C1"));
        let r2 = add(&c, "b", Some("T2"), None);
        catch_up(&c, RUN).unwrap();
        let some = |s: &str| Some(s.to_string());
        forget(&c, &[(r1, some("T1"), some("C1")), (r2, some("T2"), None)]).unwrap();
        c.execute("DELETE FROM events", []).unwrap();
        let left: i64 = c
            .query_row("SELECT count(*) FROM event_ids", [], |r| r.get(0))
            .unwrap();
        assert_eq!(left, 0);
        let r3 = add(&c, "c", Some("T1"), None);
        assert!(r3 > r2, "{r3} after {r2}");
        assert_eq!(find(&c, &["transaction_id"], "T1"), ["c"]);
        assert_eq!(catch_up(&c, RUN).unwrap(), 1);
        assert_eq!(find(&c, &["transaction_id"], "T1"), ["c"]);
    }
}
