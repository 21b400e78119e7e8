//! The service's socket: one connection per mail process, records in, acknowledgements
//! out.
//!
//! A connection is trusted as far as its peer's credentials (`SO_PEERCRED`, the uid the
//! mail process had when it connected) allow ([`Trust`]); each line is one record
//! ([`dovepush_protocol::record`]), checked, then handed to the dispatcher with an
//! [`Ack`] that answers it once the dispatcher let go of it. Acknowledgements that are due
//! together go out in one write. A line longer than a record can be ends the connection
//! (the plugin then drops what it still holds into the drop spool).
//!
//! When the service stops, connections stop taking records once none arrived for a
//! moment, so that what mail processes that already exited left in the socket is not
//! lost.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tokio_util::codec::{FramedRead, LinesCodec, LinesCodecError};

use dovepush_protocol::record::{encode_ack, Record, MAX_RECORD_BYTES};

use crate::dispatch::{Ack, Input};
use crate::trust::{system_uid, Trust};

/// When stopping, a connection quiet this long is done.
const QUIET_AT_STOP: Duration = Duration::from_millis(50);

/// Accept connections until `stop` turns true; each runs until its peer closes it or
/// the service stops.
pub async fn serve(
    listener: UnixListener,
    input: mpsc::Sender<Input>,
    trust: Trust,
    mut stop: watch::Receiver<bool>,
) {
    let mut next_conn = 0u64;
    let watching = stop.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    next_conn += 1;
                    tokio::spawn(connection(stream, next_conn, input.clone(), trust, watching.clone()));
                }
                Err(e) => {
                    tracing::error!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = stopped(&mut stop) => return,
        }
    }
}

async fn connection(
    stream: UnixStream,
    conn: u64,
    input: mpsc::Sender<Input>,
    trust: Trust,
    mut stop: watch::Receiver<bool>,
) {
    let uid = match stream.peer_cred() {
        Ok(cred) => cred.uid(),
        Err(e) => {
            tracing::error!("a connection's peer is unknown ({e}); closed");
            return;
        }
    };
    let (read, write) = stream.into_split();
    let (acks, ack_rx) = mpsc::unbounded_channel();
    tokio::spawn(write_acks(write, ack_rx));
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_RECORD_BYTES));
    let mut seq = 0u64;
    let mut stopping = false;
    loop {
        let line = if stopping {
            match tokio::time::timeout(QUIET_AT_STOP, lines.next()).await {
                Ok(line) => line,
                Err(_) => break,
            }
        } else {
            tokio::select! {
                line = lines.next() => line,
                _ = stopped(&mut stop) => {
                    stopping = true;
                    continue;
                }
            }
        };
        let line = match line {
            None => break,
            Some(Ok(line)) => line,
            Some(Err(LinesCodecError::MaxLineLengthExceeded)) => {
                tracing::error!(
                    "uid {uid} sent more than {MAX_RECORD_BYTES} bytes without a newline; connection closed"
                );
                break;
            }
            Some(Err(LinesCodecError::Io(_))) => break,
        };
        seq += 1;
        let ack = Ack {
            to: acks.clone(),
            seq,
            conn,
        };
        match Record::decode(line.as_bytes()) {
            Err(e) => {
                tracing::error!("uid {uid} sent something that is not a record: {e}; dropped");
                ack.send();
            }
            Ok(record) if record.endpoint.is_some() => {
                tracing::error!(
                    user = %record.user,
                    "event {} from uid {uid} names an endpoint (mail processes never do); never sent",
                    record.id
                );
                ack.send();
            }
            Ok(record) => match trust.admits(uid, &record.user, &system_uid) {
                Err(why) => {
                    tracing::error!(
                        user = %record.user,
                        "event {} refused: {why}; never sent",
                        record.id
                    );
                    ack.send();
                }
                Ok(()) => {
                    if input
                        .send(Input::Record {
                            record: Box::new(record),
                            ack,
                        })
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            },
        }
    }
    let _ = input.send(Input::Closed { conn }).await;
}

/// Resolves once the service is stopping.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            // The service is going away all the same.
            return;
        }
    }
}

/// Write acknowledgements as they come, all that are due in one write.
async fn write_acks(mut write: OwnedWriteHalf, mut acks: mpsc::UnboundedReceiver<u64>) {
    let mut buf = Vec::with_capacity(256);
    while let Some(seq) = acks.recv().await {
        buf.clear();
        encode_ack(seq, &mut buf);
        while let Ok(seq) = acks.try_recv() {
            encode_ack(seq, &mut buf);
        }
        if write.write_all(&buf).await.is_err() {
            return;
        }
    }
}
