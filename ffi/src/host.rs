//! Borrowed views of Dovecot objects, valid only during one callback.
//!
//! Each view holds the raw pointer Dovecot handed to the callback and a lifetime that
//! ties it to that callback. Methods copy what they read into owned Rust values before
//! returning, so nothing borrowed from Dovecot's pools or data stack escapes.

use std::ffi::{c_char, CStr, CString};
use std::marker::PhantomData;

use crate::bindings as sys;

/// Severity of a line sent to Dovecot's logger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warning,
    Error,
}

impl LogLevel {
    fn raw(self) -> i32 {
        (match self {
            LogLevel::Debug => sys::DOVEPUSH_LOG_DEBUG,
            LogLevel::Info => sys::DOVEPUSH_LOG_INFO,
            LogLevel::Warning => sys::DOVEPUSH_LOG_WARNING,
            LogLevel::Error => sys::DOVEPUSH_LOG_ERROR,
        }) as i32
    }
}

/// A C string for Dovecot: interior NULs become spaces instead of failing.
fn c_text(text: &str) -> CString {
    CString::new(text.replace('\0', " ")).expect("NULs were replaced")
}

/// Copy a nullable C string into an owned `String` (invalid UTF-8 becomes U+FFFD).
///
/// # Safety
/// `ptr` is NULL or points to a NUL-terminated string valid for this call.
unsafe fn owned(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        None
    } else {
        // SAFETY: the caller guarantees a valid NUL-terminated string.
        Some(
            unsafe { CStr::from_ptr(ptr) }
                .to_string_lossy()
                .into_owned(),
        )
    }
}

/// Log with the process's log prefix (no user context). Dovecot's thread only.
pub fn log_process(level: LogLevel, message: &str) {
    let text = c_text(message);
    // SAFETY: a NULL user is allowed; `text` outlives the call; Dovecot's thread.
    unsafe { sys::dovepush_shim_log(std::ptr::null_mut(), level.raw(), text.as_ptr()) }
}

/// The mail user a callback runs for.
pub struct User<'a> {
    raw: *mut sys::mail_user,
    _callback: PhantomData<&'a ()>,
}

impl<'a> User<'a> {
    /// # Safety
    /// `raw` is a live `struct mail_user` for the duration of `'a`, on Dovecot's thread.
    pub(crate) unsafe fn from_raw(raw: *mut sys::mail_user) -> Self {
        User {
            raw,
            _callback: PhantomData,
        }
    }

    /// The Dovecot username (e.g. `alice@example.com` in LMTP, `alice` in LDA).
    pub fn name(&self) -> String {
        // SAFETY: live user (constructor contract); the name is copied at once.
        unsafe { owned(sys::dovepush_shim_user_name(self.raw)) }.unwrap_or_default()
    }

    /// The user's settings among `names` that are set, as `(name, value)` pairs: on
    /// Dovecot 2.3 the `plugin {}` or userdb values (%-expanded), on 2.4 the typed
    /// settings written back in a syntax 2.3 values may have (`60000ms`, `yes`). See
    /// `dovepush_shim_user_settings` in `include/dovepush-shim.h`.
    pub fn settings(&self, names: &[&str]) -> Result<Vec<(String, String)>, String> {
        let keys: Vec<CString> = names.iter().map(|n| c_text(n)).collect();
        let mut list: Vec<*const c_char> = keys.iter().map(|k| k.as_ptr()).collect();
        list.push(std::ptr::null());
        let mut pairs: *const *const c_char = std::ptr::null();
        let mut error: *const c_char = std::ptr::null();
        // SAFETY: live user; `list` is NULL-terminated and, with the strings it points
        // to, outlives the call; the out-pointers are valid.
        let count = unsafe {
            sys::dovepush_shim_user_settings(self.raw, list.as_ptr(), &mut pairs, &mut error)
        };
        if count < 0 {
            // SAFETY: on -1 the shim set `error` to a string valid for this callback (or
            // left it NULL); it is copied here.
            return Err(unsafe { owned(error) }.unwrap_or_else(|| "unknown error".into()));
        }
        let count = count as usize;
        if count == 0 || pairs.is_null() {
            return Ok(Vec::new());
        }
        // SAFETY: the shim returned `count` pairs, 2 * count valid C strings that live
        // until this callback returns; each is copied before returning.
        let texts = unsafe { std::slice::from_raw_parts(pairs, 2 * count) };
        Ok(texts
            .chunks_exact(2)
            .map(|pair| {
                // SAFETY: as above.
                let (name, value) = unsafe { (owned(pair[0]), owned(pair[1])) };
                (name.unwrap_or_default(), value.unwrap_or_default())
            })
            .collect())
    }

    /// Dovecot's `base_dir`, where the master's service sockets are.
    pub fn base_dir(&self) -> Option<String> {
        // SAFETY: live user; the path is copied at once.
        unsafe { owned(sys::dovepush_shim_user_base_dir(self.raw)) }
    }

    /// Whether `mail_debug` is on for this user.
    pub fn mail_debug(&self) -> bool {
        // SAFETY: live user.
        unsafe { sys::dovepush_shim_user_mail_debug(self.raw) }
    }

    /// Log with the user's log prefix (it names the user and session).
    pub fn log(&self, level: LogLevel, message: &str) {
        let text = c_text(message);
        // SAFETY: live user; `text` outlives the call.
        unsafe { sys::dovepush_shim_log(self.raw, level.raw(), text.as_ptr()) }
    }
}

/// A mailbox a delivery saves into.
pub struct Mailbox<'a> {
    raw: *mut sys::mailbox,
    _callback: PhantomData<&'a ()>,
}

impl<'a> Mailbox<'a> {
    /// # Safety
    /// `raw` is a live `struct mailbox` for the duration of `'a`, on Dovecot's thread.
    pub(crate) unsafe fn from_raw(raw: *mut sys::mailbox) -> Self {
        Mailbox {
            raw,
            _callback: PhantomData,
        }
    }

    /// The virtual name, e.g. `INBOX` or `Archive/2024`.
    pub fn vname(&self) -> String {
        // SAFETY: live mailbox; the name is copied at once.
        unsafe { owned(sys::dovepush_shim_mailbox_vname(self.raw)) }.unwrap_or_default()
    }

    /// Read the user's private *server* METADATA entry `/private/<key>` (IMAP mailbox
    /// `""`), which Dovecot keeps on the user's INBOX. `Ok(None)` when not set.
    pub fn server_metadata(&self, key: &str) -> Result<Option<String>, String> {
        let key = c_text(key);
        let mut value: *const c_char = std::ptr::null();
        let mut error: *const c_char = std::ptr::null();
        // SAFETY: live mailbox; out-pointers are valid; results copied before returning
        // (they live on the data stack frame of the current callback).
        let ret = unsafe {
            sys::dovepush_shim_server_metadata(self.raw, key.as_ptr(), &mut value, &mut error)
        };
        match ret {
            // SAFETY: on 1 the shim set `value` to a NUL-terminated string (or left it
            // NULL), valid until this callback returns; it is copied here.
            r if r > 0 => Ok(Some(unsafe { owned(value) }.unwrap_or_default())),
            0 => Ok(None),
            // SAFETY: on -1 the shim set `error` likewise (or left it NULL).
            _ => Err(unsafe { owned(error) }.unwrap_or_else(|| "unknown error".into())),
        }
    }

    /// Messages without `\Seen`, as committed to the index (no mailbox sync).
    pub fn unseen(&self) -> Result<u32, String> {
        let mut unseen = 0u32;
        let mut error: *const c_char = std::ptr::null();
        // SAFETY: live mailbox; out-pointers valid; the error is copied at once.
        let ret = unsafe { sys::dovepush_shim_mailbox_unseen(self.raw, &mut unseen, &mut error) };
        if ret < 0 {
            // SAFETY: on -1 the shim set `error` to a NUL-terminated string valid for this
            // callback (or left it NULL); it is copied here.
            Err(unsafe { owned(error) }.unwrap_or_else(|| "unknown error".into()))
        } else {
            Ok(unseen)
        }
    }
}

/// Facts copied out of one saved mail: the first raw `From:` and `Subject:` values
/// (undecoded, as the ox driver sends them) and the body snippet (≤ 200 characters).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedMail {
    pub from: Option<String>,
    pub subject: Option<String>,
    pub snippet: Option<String>,
}

impl SavedMail {
    /// # Safety
    /// `raw` points to a valid `dovepush_saved_mail` for this call.
    pub(crate) unsafe fn from_raw(raw: *const sys::dovepush_saved_mail) -> Self {
        // SAFETY: caller contract; each string is NULL or NUL-terminated.
        unsafe {
            let raw = &*raw;
            SavedMail {
                from: owned(raw.from),
                subject: owned(raw.subject),
                snippet: owned(raw.snippet),
            }
        }
    }
}

/// What the storage reported at commit: UIDVALIDITY and the UIDs of the saves, in
/// save order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Commit {
    pub uid_validity: u32,
    pub uids: Vec<u32>,
    /// The unseen count right after the commit when the shim knows it (mails whose UIDs
    /// were assigned after the commit are not in the index yet); `None`: ask the mailbox.
    pub unseen: Option<u32>,
}

impl Commit {
    /// # Safety
    /// `raw` points to a valid `dovepush_commit` whose `uids` has `uid_count` entries.
    pub(crate) unsafe fn from_raw(raw: *const sys::dovepush_commit) -> Self {
        // SAFETY: caller contract.
        unsafe {
            let raw = &*raw;
            let uids = if raw.uids.is_null() || raw.uid_count == 0 {
                Vec::new()
            } else {
                std::slice::from_raw_parts(raw.uids, raw.uid_count as usize).to_vec()
            };
            Commit {
                uid_validity: raw.uid_validity,
                uids,
                unseen: raw.unseen_known.then_some(raw.unseen),
            }
        }
    }
}

/// What a committed transaction outside deliveries (in imap: one IMAP command's) did to
/// the unseen count of its mailbox: `\Seen` set or cleared, mails expunged (moving mails
/// out of a mailbox expunges them there), unseen mails added (`APPEND`, or `COPY`/`MOVE`
/// into it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    pub uid_validity: u32,
    /// Mails that got `\Seen`.
    pub seen_set: u32,
    /// Mails that lost `\Seen`.
    pub seen_cleared: u32,
    /// Mails expunged.
    pub expunged: u32,
    /// Of those, the ones without `\Seen`.
    pub expunged_unseen: u32,
    /// Mails without `\Seen` added.
    pub added_unseen: u32,
    /// The highest UID among the mails above.
    pub last_uid: u32,
    /// The mailbox's unseen count after the transaction (its expunges taken off), when
    /// it could be read.
    pub unseen: Option<u32>,
}

impl Change {
    /// # Safety
    /// `raw` points to a valid `dovepush_change` for this call.
    pub(crate) unsafe fn from_raw(raw: *const sys::dovepush_change) -> Self {
        // SAFETY: caller contract; plain integers only.
        let raw = unsafe { &*raw };
        Change {
            uid_validity: raw.uid_validity,
            seen_set: raw.seen_set,
            seen_cleared: raw.seen_cleared,
            expunged: raw.expunged,
            expunged_unseen: raw.expunged_unseen,
            added_unseen: raw.added_unseen,
            last_uid: raw.last_uid,
            unseen: raw.unseen_known.then_some(raw.unseen),
        }
    }
}
