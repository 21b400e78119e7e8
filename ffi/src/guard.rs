//! The panic barrier at every Dovecot→Rust entry.
//!
//! A panic that reaches an `extern "C"` frame aborts the process; inside lmtp that
//! happens *after* the mail was saved, so the MTA retries and the user gets the mail
//! twice. [`run`] catches the panic, logs it through Dovecot's logger and returns a safe
//! default, and the delivery goes on. The panic hook installed by [`install_panic_hook`]
//! keeps the default hook from writing to stderr (which Dovecot logs as stray errors)
//! and remembers message and location for the log line.

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Mutex, Once};

use crate::host::{log_process, LogLevel};

static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);
static HOOK: Once = Once::new();

/// Replace the default panic hook (stderr) by one that records the panic for the guard.
/// Panics on background threads are recorded the same way; their owners report them.
pub fn install_panic_hook() {
    HOOK.call_once(|| {
        panic::set_hook(Box::new(|info| {
            let location = info
                .location()
                .map(|l| format!(" at {}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let text = format!("{}{}", payload_text(info.payload()), location);
            *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(text);
        }));
    });
}

/// Text of a panic payload (`&str`, `String`, or a placeholder).
pub fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-text payload".to_string()
    }
}

/// Take the text recorded by the panic hook for the last panic, if any.
pub fn take_last_panic() -> Option<String> {
    LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take()
}

/// Run `f`, converting a panic into a Dovecot error log line and `default`.
/// Must be called on Dovecot's thread (it logs through Dovecot).
pub fn run<T>(entry: &str, default: T, f: impl FnOnce() -> T) -> T {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(value) => value,
        Err(payload) => {
            let text = take_last_panic().unwrap_or_else(|| payload_text(&*payload));
            log_process(
                LogLevel::Error,
                &format!("internal error in {entry} (delivery goes on, push skipped): {text}"),
            );
            default
        }
    }
}
