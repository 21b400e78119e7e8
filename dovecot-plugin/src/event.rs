//! Event ids: unique across processes and restarts (a random per-process prefix and a
//! counter), the same for every endpoint of one event, so that receivers can drop
//! repeats (`X-Dovepush-Event-Id`).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug)]
pub struct EventIds {
    prefix: u64,
    counter: AtomicU64,
}

impl EventIds {
    pub fn new() -> Self {
        EventIds {
            prefix: random_u64(),
            counter: AtomicU64::new(0),
        }
    }

    /// 24 hexadecimal digits.
    pub fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{:08x}", self.prefix, n)
    }
}

impl Default for EventIds {
    fn default() -> Self {
        Self::new()
    }
}

fn random_u64() -> u64 {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_ok()
    {
        return u64::from_ne_bytes(bytes);
    }
    // No /dev/urandom (chroot): time and pid still make collisions unlikely.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ ((std::process::id() as u64) << 40)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_unique_and_make_valid_record_ids() {
        let ids = EventIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert_eq!(a.len(), 24);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(EventIds::new().next(), a);
    }
}
