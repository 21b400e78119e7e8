//! A minimal blocking IMAP client for tests: log in, send tagged commands, read their
//! untagged answers. Enough to mark mails `\Seen`, expunge them, append mails and ask
//! `STATUS`, as a mail app would; literals only in `APPEND` (LITERAL+), no IDLE.

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

/// One IMAP connection, logged in.
pub struct ImapClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    tag: u32,
}

impl ImapClient {
    /// Connects to `127.0.0.1:port` and logs in with `LOGIN`.
    pub fn login(port: u16, user: &str, password: &str) -> io::Result<ImapClient> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let writer = stream.try_clone()?;
        let mut client = ImapClient {
            reader: BufReader::new(stream),
            writer,
            tag: 0,
        };
        let mut greeting = String::new();
        client.reader.read_line(&mut greeting)?;
        if !greeting.starts_with("* OK") {
            return Err(io::Error::other(format!("IMAP greeting: {greeting}")));
        }
        client.command(&format!("LOGIN {} {}", quoted(user), quoted(password)))?;
        Ok(client)
    }

    /// Sends `command` and returns its untagged lines; an answer other than `OK` is an
    /// error carrying the tagged line.
    pub fn command(&mut self, command: &str) -> io::Result<Vec<String>> {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        self.writer
            .write_all(format!("{tag} {command}\r\n").as_bytes())?;
        self.answer(&tag, command).map(|(untagged, _)| untagged)
    }

    /// `APPEND <mailbox> (<flags>) <message>` as a non-synchronising literal (Dovecot
    /// announces LITERAL+); returns the UID the tagged `OK [APPENDUID …]` gives.
    pub fn append(&mut self, mailbox: &str, flags: &str, message: &[u8]) -> io::Result<u32> {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        let mut request = format!(
            "{tag} APPEND {} ({flags}) {{{}+}}\r\n",
            quoted(mailbox),
            message.len()
        )
        .into_bytes();
        request.extend_from_slice(message);
        request.extend_from_slice(b"\r\n");
        self.writer.write_all(&request)?;
        let (_, done) = self.answer(&tag, "APPEND")?;
        done.split("[APPENDUID ")
            .nth(1)
            .and_then(|rest| rest.split([' ', ']']).nth(1)?.parse().ok())
            .ok_or_else(|| io::Error::other(format!("no APPENDUID in {done:?}")))
    }

    /// The untagged lines up to `tag`'s answer, and that answer; other than `OK` is an
    /// error.
    fn answer(&mut self, tag: &str, command: &str) -> io::Result<(Vec<String>, String)> {
        let mut untagged = Vec::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(io::Error::other(format!("{command}: connection closed")));
            }
            let line = line.trim_end().to_string();
            if let Some(status) = line.strip_prefix(&format!("{tag} ")) {
                if status.starts_with("OK") {
                    return Ok((untagged, status.to_string()));
                }
                return Err(io::Error::other(format!("{command}: {line}")));
            }
            untagged.push(line);
        }
    }

    /// `STATUS <mailbox> (UNSEEN)`: the mailbox's unseen count, as Dovecot says it.
    pub fn unseen(&mut self, mailbox: &str) -> io::Result<u32> {
        let lines = self.command(&format!("STATUS {} (UNSEEN)", quoted(mailbox)))?;
        lines
            .iter()
            .find_map(|l| {
                let rest = l.split("(UNSEEN ").nth(1)?;
                rest.trim_end_matches(')').trim().parse().ok()
            })
            .ok_or_else(|| io::Error::other(format!("no UNSEEN in {lines:?}")))
    }

    /// `LOGOUT`.
    pub fn logout(mut self) -> io::Result<()> {
        self.command("LOGOUT").map(drop)
    }
}

fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_quoted() {
        assert_eq!(quoted("a\"b\\c"), r#""a\"b\\c""#);
    }
}
