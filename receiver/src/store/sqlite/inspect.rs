//! Read-only looks at a store file for operators and tests: the event ids committed, and
//! the event ids the outbox items carry.

use std::collections::HashSet;
use std::path::Path;

use rusqlite::Connection;

use crate::domain::event::PushContent;
use crate::domain::store::StoreError;

/// Whether an event with this id was committed (and not yet pruned).
pub fn event_ids(path: &Path) -> Result<HashSet<String>, StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let mut stmt = conn.prepare("SELECT event_id FROM events WHERE event_id IS NOT NULL")?;
    let ids = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(ids)
}

/// Event ids carried by outbox items.
pub fn outbox_event_ids(path: &Path) -> Result<HashSet<String>, StoreError> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let mut stmt = conn.prepare("SELECT content FROM outbox")?;
    let ids = stmt
        .query_map([], |r| r.get::<_, String>(0))?
        .filter_map(|c| {
            c.ok()
                .and_then(|c| serde_json::from_str::<PushContent>(&c).ok())
                .and_then(|c| c.event_id)
        })
        .collect();
    Ok(ids)
}
