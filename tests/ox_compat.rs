//! dovepush's body against the stock ox driver's, field by field: both plugins run in
//! one Dovecot, see the same deliveries and post to two sinks.

mod common;

use dovepush_testkit::dovecot::{built_plugin, Dovecot, Options};
use dovepush_testkit::messages;
use dovepush_testkit::sink::Sink;

const FIELDS: &[&str] = &[
    "user",
    "event",
    "folder",
    "imap-uidvalidity",
    "imap-uid",
    "from",
    "subject",
    "snippet",
    "unseen",
];

#[test]
fn bodies_match_the_stock_ox_driver_field_by_field() {
    let ox = Sink::start();
    let ours = Sink::start();
    let dovecot = Dovecot::start(Options {
        delivery_plugins: "notify push_notification dovepush".into(),
        dovepush_module: Some(built_plugin()),
        plugin_settings: vec![
            (
                "push_notification_driver".into(),
                format!("ox:url={}", ox.url(Some("u:p"))),
            ),
            ("dovepush_url".into(), ours.url(Some("u:p"))),
        ],
        ..Options::default()
    })
    .unwrap();
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();

    let mails = [
        messages::simple(1),
        messages::bad_encoded_words(),
        messages::missing_from(),
        messages::folded_html(),
        messages::multipart(),
        messages::simple(2),
    ];
    // One connection, one at a time: the stock driver then gets real UIDs too.
    let mut lmtp = dovecot.lmtp().unwrap();
    for mail in &mails {
        lmtp.deliver(&["alice@example.com"], mail).unwrap();
    }
    let (ok, err) = dovecot.deliver_lda("alice", &messages::simple(3)).unwrap();
    assert!(ok, "{err}");
    let n = mails.len() + 1;
    let stock = ox.wait_for(n, common::WAIT);
    let mine = ours.wait_for(n, common::WAIT);
    assert_eq!((stock.len(), mine.len()), (n, n), "{}", dovecot.log());

    let by_uid = |requests: &[dovepush_testkit::sink::Request]| {
        let mut bodies: Vec<serde_json::Value> = requests.iter().map(|r| r.json()).collect();
        bodies.sort_by_key(|b| b["imap-uid"].as_u64());
        bodies
    };
    let (stock, mine) = (by_uid(&stock), by_uid(&mine));
    for (s, m) in stock.iter().zip(&mine) {
        for field in FIELDS {
            assert_eq!(
                s.get(*field),
                m.get(*field),
                "field {field}:\nox:   {s}\nours: {m}"
            );
        }
        let keys =
            |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
        assert_eq!(keys(s), keys(m), "same keys");
    }
    // Same header set on the wire, apart from dovepush's event id.
    let stock_req = &ox.requests()[0];
    let our_req = &ours.requests()[0];
    assert_eq!(stock_req.method, our_req.method);
    assert_eq!(stock_req.path, our_req.path);
    assert_eq!(
        stock_req.header("authorization"),
        our_req.header("authorization")
    );
    assert_eq!(
        stock_req.header("content-type"),
        our_req.header("content-type")
    );
}
