//! A minimal LMTP client: one connection, any number of deliveries.

use std::io::{self, BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

pub struct LmtpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

fn protocol_error(text: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, text)
}

impl LmtpClient {
    pub fn connect(port: u16) -> io::Result<LmtpClient> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        stream.set_nodelay(true)?;
        let mut client = LmtpClient {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        };
        client.expect("220")?;
        client.command("LHLO dovepush-test")?;
        client.expect("250")?;
        Ok(client)
    }

    fn command(&mut self, line: &str) -> io::Result<()> {
        self.writer.write_all(line.as_bytes())?;
        self.writer.write_all(b"\r\n")
    }

    /// Read one (possibly multi-line) reply and check its code.
    fn expect(&mut self, code: &str) -> io::Result<String> {
        let mut reply = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(protocol_error(format!(
                    "connection closed, reply so far: {reply}"
                )));
            }
            reply.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                break;
            }
        }
        if reply.starts_with(code) {
            Ok(reply)
        } else {
            Err(protocol_error(format!("expected {code}, got {reply}")))
        }
    }

    /// Deliver `message` to `recipients`; returns the time from the end of DATA to the
    /// last recipient's reply.
    pub fn deliver(&mut self, recipients: &[&str], message: &[u8]) -> io::Result<Duration> {
        self.deliver_timed(recipients, message)
            .map(|(_, latency)| latency)
    }

    /// As [`LmtpClient::deliver`], also returning when the end of DATA was written.
    pub fn deliver_timed(
        &mut self,
        recipients: &[&str],
        message: &[u8],
    ) -> io::Result<(Instant, Duration)> {
        self.command("MAIL FROM:<sender@example.net>")?;
        self.expect("250")?;
        for rcpt in recipients {
            self.command(&format!("RCPT TO:<{rcpt}>"))?;
            self.expect("250")?;
        }
        self.command("DATA")?;
        self.expect("354")?;
        let mut data = Vec::with_capacity(message.len() + 64);
        for line in message.split_inclusive(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.first() == Some(&b'.') {
                data.push(b'.');
            }
            data.extend_from_slice(line);
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b".\r\n");
        self.writer.write_all(&data)?;
        let start = Instant::now();
        for _ in recipients {
            self.expect("250")?;
        }
        Ok((start, start.elapsed()))
    }
}

impl Drop for LmtpClient {
    fn drop(&mut self) {
        let _ = self.command("QUIT");
    }
}
