//! Badge events from imap on Dovecot 2.3, at the plugin's edge (an HTTP sink as the
//! receiver): which IMAP commands give a `messageRead` or a `messageAppend` and which
//! give nothing, one event per command, only for subscribed users. (The whole path to APNs is
//! `receiver/tests/dovecot_e2e.rs`; 2.4 is `tests/dovecot24.rs`.)

mod common;

use common::WAIT;
use dovepush_testkit::dovecot::{built_plugin, Dovecot, Options};
use dovepush_testkit::imap::ImapClient;
use dovepush_testkit::messages;
use dovepush_testkit::sink::{Request, Sink};

fn dovecot_with_badges(url: &str) -> Dovecot {
    Dovecot::start(Options {
        delivery_plugins: "notify dovepush".into(),
        imap_plugins: "notify dovepush".into(),
        dovepush_module: Some(built_plugin()),
        plugin_settings: vec![
            ("dovepush_url".into(), url.into()),
            (
                "dovepush_events".into(),
                "messageNew messageRead messageExpunge messageAppend".into(),
            ),
        ],
        ..Options::default()
    })
    .expect("starting a private Dovecot")
}

/// The sink, and a Dovecot taking badge events where alice subscribed (bob did not).
fn alice_subscribed() -> (Sink, Dovecot) {
    let sink = Sink::start();
    let dovecot = dovecot_with_badges(&sink.url(None));
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    (sink, dovecot)
}

/// `(event, unseen)` of a request.
fn event(r: &Request) -> (String, u64) {
    let body = r.json();
    (
        body["event"].as_str().unwrap_or_default().to_string(),
        body["unseen"].as_u64().unwrap_or(u64::MAX),
    )
}

#[test]
fn fetching_a_body_and_setting_or_clearing_seen_are_read_events_other_flags_nothing() {
    let (sink, dovecot) = alice_subscribed();
    let mut lmtp = dovecot.lmtp().unwrap();
    for n in 1..=2 {
        lmtp.deliver(
            &["alice@example.com", "bob@example.com"],
            &messages::simple(n),
        )
        .unwrap();
    }
    assert_eq!(sink.wait_for(2, WAIT).len(), 2, "{}", dovecot.log());

    let mut alice = ImapClient::login(dovecot.imap_port, "alice", "alice-secret").unwrap();
    alice.command("SELECT INBOX").unwrap();
    let mut expected = Vec::new();
    // (command, the event it gives: unseen after it)
    for (command, unseen) in [
        ("FETCH 1 BODY[]", Some(1)),
        ("STORE 2 +FLAGS.SILENT (\\Flagged)", None),
        ("FETCH 1:2 BODY.PEEK[]", None),
        ("STORE 1:2 +FLAGS.SILENT (\\Seen)", Some(0)),
        ("STORE 1 -FLAGS.SILENT (\\Seen)", Some(1)),
    ] {
        alice.command(command).unwrap();
        if let Some(unseen) = unseen {
            expected.push(("messageRead".to_string(), unseen));
            let got = sink.wait_for(2 + expected.len(), WAIT);
            assert_eq!(
                got.len(),
                2 + expected.len(),
                "{command}\n{}",
                dovecot.log()
            );
        }
        assert_eq!(alice.unseen("INBOX").unwrap() as usize, {
            expected.last().map_or(2, |(_, u)| *u as usize)
        });
    }
    alice.logout().unwrap();

    // bob has no subscription: his reads send nothing.
    let mut bob = ImapClient::login(dovecot.imap_port, "bob", "bob-secret").unwrap();
    bob.command("SELECT INBOX").unwrap();
    bob.command("STORE 1:2 +FLAGS.SILENT (\\Seen)").unwrap();
    bob.logout().unwrap();
    // A last event of alice's, after bob's: once it is in, bob's would have been too.
    let mut alice = ImapClient::login(dovecot.imap_port, "alice", "alice-secret").unwrap();
    alice.command("SELECT INBOX").unwrap();
    alice.command("STORE 1 +FLAGS.SILENT (\\Seen)").unwrap();
    alice.logout().unwrap();
    expected.push(("messageRead".to_string(), 0));
    let got = sink.wait_for(2 + expected.len(), WAIT);
    let events: Vec<(String, u64)> = got[2..].iter().map(event).collect();
    assert_eq!(events, expected, "{}", dovecot.log());
    let body = got.last().unwrap().json();
    assert_eq!(body["user"], "alice");
    assert_eq!(body["folder"], "INBOX");
    assert_eq!(body["imap-uid"], 1);
    assert!(body["imap-uidvalidity"].as_u64().unwrap() > 0);
    let log = dovecot.log();
    assert!(!log.contains("Error:") && !log.contains("Panic:"), "{log}");
}

#[test]
fn unseen_mail_appended_copied_or_moved_in_is_an_append_event_seen_mail_nothing() {
    let (sink, dovecot) = alice_subscribed();
    let mut lmtp = dovecot.lmtp().unwrap();
    lmtp.deliver(&["alice@example.com"], &messages::simple(1))
        .unwrap();
    assert_eq!(sink.wait_for(1, WAIT).len(), 1, "{}", dovecot.log());

    let mut alice = ImapClient::login(dovecot.imap_port, "alice", "alice-secret").unwrap();
    alice.command("CREATE Archive").unwrap();
    // Not a watched mailbox: nothing.
    alice.append("Archive", "", &messages::simple(2)).unwrap();
    alice
        .append("Archive", "\\Seen", &messages::simple(3))
        .unwrap();
    // Seen mail into INBOX leaves its unseen count alone: nothing.
    alice
        .append("INBOX", "\\Seen", &messages::simple(4))
        .unwrap();
    let mut expected = Vec::new();
    // (what, unseen in INBOX after it, the UID of the last unseen mail it added there)
    // One command at a time: each one's request is in before the next command.
    let after = |expected: &mut Vec<_>, what: &'static str, unseen: u64, uid: u32| {
        expected.push((what, unseen, uid));
        let got = sink.wait_for(1 + expected.len(), WAIT);
        assert_eq!(got.len(), 1 + expected.len(), "{what}\n{}", dovecot.log());
    };
    let appended = alice.append("INBOX", "", &messages::simple(5)).unwrap();
    after(&mut expected, "APPEND", 2, appended);
    alice.command("SELECT Archive").unwrap();
    // Archive's mail 2 is seen, mail 1 is not: copying both adds one unseen mail, and
    // the event names that one (UID 4), not the seen copy after it (UID 5).
    alice.command("COPY 1:2 INBOX").unwrap();
    after(&mut expected, "COPY", 3, appended + 1);
    alice.command("MOVE 2 INBOX").unwrap();
    alice.command("MOVE 1 INBOX").unwrap();
    after(&mut expected, "MOVE", 4, appended + 4);
    assert_eq!(alice.unseen("INBOX").unwrap(), 4);
    alice.logout().unwrap();

    let got = sink.requests();
    for (request, (what, unseen, uid)) in got[1..].iter().zip(&expected) {
        let body = request.json();
        assert_eq!(body["event"], "messageAppend", "{what}: {body}");
        assert_eq!(body["folder"], "INBOX", "{what}");
        assert_eq!(body["unseen"], *unseen, "{what}: {body}");
        assert_eq!(body["imap-uid"], *uid, "{what}: {body}");
    }
    // Nothing more came: a last read after the rest is the next request.
    let mut alice = ImapClient::login(dovecot.imap_port, "alice", "alice-secret").unwrap();
    alice.command("SELECT INBOX").unwrap();
    alice.command("STORE 1 +FLAGS.SILENT (\\Seen)").unwrap();
    alice.logout().unwrap();
    let got = sink.wait_for(2 + expected.len(), WAIT);
    assert_eq!(event(got.last().unwrap()), ("messageRead".to_string(), 3));
    assert_eq!(got.len(), 2 + expected.len());
    let log = dovecot.log();
    assert!(!log.contains("Error:") && !log.contains("Panic:"), "{log}");
}
