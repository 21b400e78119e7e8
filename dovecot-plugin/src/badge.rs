//! Badge events: what an IMAP command did to a watched mailbox's unseen count, as one
//! `messageRead`, `messageExpunge` or `messageAppend` notification.
//!
//! The shim counts, per transaction (one IMAP command: `STORE 1:500 +FLAGS \Seen` is
//! one), the mails whose `\Seen` changed, the mails expunged and the unseen mails added
//! (`APPEND`, `COPY` or `MOVE` into the mailbox), and reads the unseen count after the
//! commit. [`badge_event`] decides from those counts whether the
//! command changed the unseen count, and so whether it is worth a (silent) push.

use dovepush_ffi::Change;
use dovepush_protocol::notification::EventKind;

/// Why a change gives no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Nothing that moves the unseen count (only seen mails expunged, say).
    UnseenUnchanged,
    /// The count after the change could not be read: a badge without it is no use.
    UnseenUnknown,
}

/// The event for a committed change, with the unseen count it carries.
///
/// - Any expunged mail without `\Seen` makes it a `messageExpunge` (also when the same
///   command changed flags: one command, one event).
/// - Otherwise any unseen mail added makes it a `messageAppend`.
/// - Otherwise any `\Seen` set or cleared makes it a `messageRead`.
/// - Expunging only seen mails leaves the count as it was: no event (background pushes
///   are rationed by Apple; there is nothing to update).
pub fn badge_event(change: &Change) -> Result<(EventKind, u32), Skip> {
    let kind = if change.expunged_unseen > 0 {
        EventKind::MessageExpunge
    } else if change.added_unseen > 0 {
        EventKind::MessageAppend
    } else if change.seen_set > 0 || change.seen_cleared > 0 {
        EventKind::MessageRead
    } else {
        return Err(Skip::UnseenUnchanged);
    };
    let unseen = change.unseen.ok_or(Skip::UnseenUnknown)?;
    Ok((kind, unseen))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change() -> Change {
        Change {
            uid_validity: 7,
            unseen: Some(2),
            last_uid: 5,
            ..Change::default()
        }
    }

    #[test]
    fn seen_changes_are_a_read_event() {
        let set = Change {
            seen_set: 3,
            ..change()
        };
        assert_eq!(badge_event(&set), Ok((EventKind::MessageRead, 2)));
        let cleared = Change {
            seen_cleared: 1,
            ..change()
        };
        assert_eq!(badge_event(&cleared), Ok((EventKind::MessageRead, 2)));
    }

    #[test]
    fn expunging_unseen_mail_is_an_expunge_event_even_with_flag_changes() {
        let c = Change {
            seen_set: 1,
            expunged: 2,
            expunged_unseen: 1,
            ..change()
        };
        assert_eq!(badge_event(&c), Ok((EventKind::MessageExpunge, 2)));
    }

    #[test]
    fn unseen_mail_added_is_an_append_event_unless_unseen_mail_went_too() {
        let added = Change {
            added_unseen: 2,
            seen_cleared: 1,
            ..change()
        };
        assert_eq!(badge_event(&added), Ok((EventKind::MessageAppend, 2)));
        let both = Change {
            expunged_unseen: 1,
            ..added
        };
        assert_eq!(badge_event(&both), Ok((EventKind::MessageExpunge, 2)));
    }

    #[test]
    fn what_leaves_the_count_alone_or_cannot_say_it_sends_nothing() {
        let seen_only = Change {
            expunged: 4,
            ..change()
        };
        assert_eq!(badge_event(&seen_only), Err(Skip::UnseenUnchanged));
        assert_eq!(badge_event(&change()), Err(Skip::UnseenUnchanged));
        let unknown = Change {
            seen_set: 1,
            unseen: None,
            ..change()
        };
        assert_eq!(badge_event(&unknown), Err(Skip::UnseenUnknown));
    }
}
