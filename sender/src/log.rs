//! Log lines in Dovecot's own format, written to stderr, which the master connects to its
//! log process: each line is `\x01`, a type byte, the pid, a space and the text (see
//! `src/lib/failures.c`). The type byte carries the level and the flags that the line
//! brings its own prefix and where in it the level goes, so that lines about a user read
//! `dovepush(alice): Warning: …` like Dovecot's own mail processes' lines.
//!
//! The service logs with `tracing`; a `user` field names the user in the prefix, other
//! fields are appended as `key=value`.

use std::fmt::Write as _;
use std::io::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;

/// Dovecot's log process reads at most this much per line atomically (`PIPE_BUF`).
const MAX_LINE: usize = 4096;
/// The type byte's flag for "this line has its own prefix".
const OWN_PREFIX: u8 = 0x80;
/// The type byte's flag for "the position of the level text in the prefix follows".
const PREFIX_LEN: u8 = 0x40;

/// The layer that writes events to stderr for Dovecot's log process.
pub struct DovecotLog {
    service: String,
    pid: u32,
}

#[derive(Default)]
struct Fields {
    message: String,
    user: Option<String>,
    rest: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.message.push_str(value),
            "user" => self.user = Some(value.to_string()),
            name => {
                let _ = write!(self.rest, " {name}={value}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.message, "{value:?}");
            }
            "user" => self.user = Some(format!("{value:?}")),
            name => {
                let _ = write!(self.rest, " {name}={value:?}");
            }
        }
    }
}

/// One log line in Dovecot's internal format, newline included.
pub fn format_line(
    level: Level,
    pid: u32,
    service: &str,
    user: Option<&str>,
    text: &str,
) -> Vec<u8> {
    let kind: u8 = match level {
        Level::TRACE | Level::DEBUG => 0,
        Level::INFO => 1,
        Level::WARN => 2,
        Level::ERROR => 3,
    };
    let mut line = vec![0x01, OWN_PREFIX | PREFIX_LEN | (kind + 1)];
    let mut prefix = service.to_string();
    if let Some(user) = user {
        let _ = write!(prefix, "({user})");
    }
    prefix.push_str(": ");
    // Dovecot puts the level ("Warning: ") at that position, after our prefix.
    line.extend_from_slice(format!("{pid} {} {prefix}", prefix.len()).as_bytes());
    // One event, one line: Dovecot would take an embedded newline for a new line.
    let text = text.replace(['\n', '\r'], " ");
    let room = MAX_LINE - 1 - line.len().min(MAX_LINE - 1);
    line.extend_from_slice(dovepush_protocol::notification::cut_bytes(&text, room).as_bytes());
    line.push(b'\n');
    line
}

impl<S: Subscriber> Layer<S> for DovecotLog {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        fields.message.push_str(&fields.rest);
        let line = format_line(
            *event.metadata().level(),
            self.pid,
            &self.service,
            fields.user.as_deref(),
            &fields.message,
        );
        // stderr is unbuffered: one write per line, which the pipe keeps whole.
        let _ = std::io::stderr().lock().write_all(&line);
    }
}

/// Send this process's `tracing` events to Dovecot's log; debug lines only with `debug`.
pub fn init(service: &str, debug: bool) {
    let level = if debug {
        tracing_subscriber::filter::LevelFilter::DEBUG
    } else {
        tracing_subscriber::filter::LevelFilter::INFO
    };
    let layer = DovecotLog {
        service: service.to_string(),
        pid: std::process::id(),
    };
    let _ = tracing_subscriber::registry()
        .with(layer.with_filter(level))
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_level_pid_and_their_own_prefix() {
        let line = format_line(Level::WARN, 42, "dovepush", Some("alice"), "a\nb");
        assert_eq!(&line[..2], &[0x01, 0xc3]);
        assert_eq!(&line[2..], b"42 17 dovepush(alice): a b\n");
        let line = format_line(Level::ERROR, 7, "dovepush", None, "x");
        assert_eq!(&line[..2], &[0x01, 0xc4]);
        assert_eq!(&line[2..], b"7 10 dovepush: x\n");
        assert_eq!(format_line(Level::DEBUG, 7, "d", None, "x")[1], 0xc1);
        assert_eq!(format_line(Level::INFO, 7, "d", None, "x")[1], 0xc2);
    }

    #[test]
    fn long_lines_stay_within_one_pipe_write() {
        let line = format_line(Level::INFO, 1, "dovepush", None, &"é".repeat(5000));
        assert!(line.len() <= MAX_LINE);
        assert!(std::str::from_utf8(&line[2..]).is_ok());
        assert_eq!(line.last(), Some(&b'\n'));
    }
}
