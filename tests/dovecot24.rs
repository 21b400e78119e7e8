//! End to end on Dovecot 2.4.1 (Debian 13's), in the Debian 13 root of
//! `dovepush_testkit::debian13`, with dovepush built inside it: the module and its
//! settings module load in lmtp and lda with 2.4-native settings, doveconf knows them,
//! the body equals the stock 2.4 ox driver's, and push trouble never slows, fails or
//! loses a delivery. Each test skips itself (saying why, once) when no Debian 13 root
//! can be built on this machine.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::WAIT;
use dovepush_testkit::debian13::{self, Debian13};
use dovepush_testkit::dovecot::{system_user_in, Dovecot, Options, SENDER_USER};
use dovepush_testkit::free_port;
use dovepush_testkit::messages;
use dovepush_testkit::procfs;
use dovepush_testkit::sink::{url_for, Request, Sink};

/// The Debian 13 root, or `None` (the test returns: skipped).
fn root() -> Option<&'static Debian13> {
    debian13::get().ok()
}

/// Dovecot 2.4 with `notify dovepush` for lmtp and lda, `dovepush_url = url`, plus
/// `extra` global settings.
fn dovecot_with_dovepush(d13: &'static Debian13, url: &str, extra: &[(&str, &str)]) -> Dovecot {
    let mut settings = vec![("dovepush_url".to_string(), url.to_string())];
    settings.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Dovecot::start(Options {
        delivery_plugins: "notify dovepush".into(),
        dovepush_module: Some(d13.plugin.clone()),
        plugin_settings: settings,
        debian13: Some(d13),
        ..Options::default()
    })
    .expect("starting a private Dovecot 2.4")
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

/// Log lines that say something went wrong (the master's SIGTERM note at a stop aside).
fn complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("Error:") || l.contains("Panic:") || l.contains("Fatal:"))
        .collect()
}

/// `doveconf` of the root on a config file inside it: (success, stdout, stderr).
fn doveconf(d13: &Debian13, config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let inner = std::path::Path::new("/").join(config.strip_prefix(&d13.root).unwrap());
    let out = d13
        .command("doveconf")
        .arg("-c")
        .arg(&inner)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_module_loads_in_lmtp_and_lda_with_2_4_settings_and_notifies() {
    let Some(d13) = root() else { return };
    let sink = Sink::start();
    let dovecot = dovecot_with_dovepush(
        d13,
        &sink.url(Some("push:s3cret")),
        &[
            ("dovepush_debug", "yes"),
            ("dovepush_cache_lifetime", "2 mins"),
        ],
    );
    assert!(d13.version.starts_with("2.4.1"), "{}", d13.version);
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();

    let mut lmtp = dovecot.lmtp().unwrap();
    lmtp.deliver(&["alice@example.com"], &messages::simple(1))
        .unwrap();
    let requests = sink.wait_for(1, WAIT);
    assert_eq!(requests.len(), 1, "log:\n{}", dovecot.log());
    let r = &requests[0];
    assert_eq!(r.method, "PUT");
    assert_eq!(r.path, "/preliminary/http-notify/v1/notify");
    assert_eq!(r.header("authorization"), Some("Basic cHVzaDpzM2NyZXQ="));
    assert_eq!(
        r.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert!(r.event_id().is_some_and(|id| !id.is_empty()));
    let body = r.json();
    assert_eq!(body["user"], "alice@example.com");
    assert_eq!(body["event"], "messageNew");
    assert_eq!(body["folder"], "INBOX");
    assert!(body["imap-uidvalidity"].as_u64().unwrap() > 0);
    assert_eq!(body["imap-uid"], 1);
    assert_eq!(
        body["from"],
        "=?utf-8?q?J=C3=BCrgen?= <juergen@example.net>"
    );
    assert_eq!(body["subject"], "Test =?utf-8?q?p=C3=A4iv=C3=A4=C3=A4?= 1");
    assert_eq!(
        body["snippet"],
        "Hello Alice, this is message number 1. Bye."
    );
    assert_eq!(body["unseen"], 1);

    let (ok, stderr) = dovecot.deliver_lda("alice", &messages::simple(2)).unwrap();
    assert!(ok, "dovecot-lda failed: {stderr}\n{}", dovecot.log());
    let requests = sink.wait_for(2, WAIT);
    assert_eq!(requests.len(), 2, "log:\n{}", dovecot.log());
    let body = requests[1].json();
    assert_eq!(body["user"], "alice");
    assert_eq!(body["imap-uid"], 2);
    assert_eq!(body["unseen"], 2);

    // The plugin read dovepush_debug (a typed 2.4 setting) in both processes, and the
    // sender service read it too (it logs what it sent).
    wait_until(WAIT, || {
        dovecot.log().contains("dovepush(alice): Info: event")
    });
    let log = dovecot.log();
    assert!(
        log.contains("lmtp(alice@example.com)")
            && log.contains("debug: delivery to INBOX followed"),
        "{log}"
    );
    assert!(log.contains("lda(alice)"), "{log}");
    assert!(log.contains("dovepush(alice): Info: event"), "{log}");
    assert!(complaints(&log).is_empty(), "{log}");

    // One sender process, the service's user; lmtp has no thread or child of ours.
    let sender = dovecot.sender_pid().expect("the sender service runs");
    let (service_uid, _) = system_user_in(Some(d13), SENDER_USER).unwrap();
    assert_eq!(procfs::uids(sender), Some([service_uid; 4]));
    let master = dovecot.master_pid().unwrap();
    let lmtps: Vec<procfs::Stat> = procfs::all()
        .into_iter()
        .filter(|p| p.comm == "lmtp" && p.ppid() == Some(master))
        .collect();
    assert!(!lmtps.is_empty());
    for lmtp in lmtps {
        assert_eq!(procfs::status_field(lmtp.pid, "Threads"), Some(1));
        assert!(!procfs::all().iter().any(|p| p.ppid() == Some(lmtp.pid)));
    }
}

#[test]
fn doveconf_lists_the_settings_with_dovepush_settings_defaults() {
    let Some(d13) = root() else { return };
    let sink = Sink::start();
    let dovecot = dovecot_with_dovepush(
        d13,
        &sink.url(Some("push:s3cret")),
        &[
            ("dovepush_batch", "yes"),
            ("dovepush_mailboxes", "INBOX Work"),
        ],
    );
    // doveconf -n: what is set, the password hidden.
    let (ok, out, err) = doveconf(d13, dovecot.config_path(), &["-n"]);
    assert!(ok, "{err}");
    for line in [
        "dovepush_batch = yes",
        "dovepush_mailboxes = INBOX Work",
        "dovepush = yes",
    ] {
        assert!(out.contains(line), "{line} missing:\n{out}");
    }
    assert!(
        out.contains("dovepush_url = http://#hidden_use-P_to_show#@127.0.0.1:"),
        "{out}"
    );
    assert!(!out.contains("s3cret"), "{out}");

    // Every setting by name, with its default: the ones dovepush-settings assumes.
    use dovepush_settings as s;
    let names: Vec<&str> = s::SETTING_NAMES.to_vec();
    let (ok, out, err) = doveconf(d13, dovecot.config_path(), &names);
    assert!(ok, "{err}");
    let values: HashMap<&str, &str> = out.lines().filter_map(|l| l.split_once(" = ")).collect();
    assert_eq!(values.len(), names.len(), "{out}");
    let interval = |k: &str| s::parse_interval(values[k]).unwrap();
    assert_eq!(
        interval("dovepush_cache_lifetime"),
        s::DEFAULT_CACHE_LIFETIME
    );
    assert_eq!(
        interval("dovepush_negative_cache_lifetime"),
        s::DEFAULT_NEGATIVE_CACHE_LIFETIME
    );
    assert_eq!(
        s::parse_msecs(values["dovepush_timeout_msecs"]).unwrap(),
        s::DEFAULT_TIMEOUT
    );
    assert_eq!(interval("dovepush_spool_max_age"), s::DEFAULT_SPOOL_MAX_AGE);
    assert_eq!(
        interval("dovepush_spool_retry_interval"),
        s::DEFAULT_SPOOL_RETRY_INTERVAL
    );
    assert_eq!(
        s::parse_size(values["dovepush_spool_max_size"]).unwrap(),
        s::DEFAULT_SPOOL_MAX_SIZE
    );
    assert_eq!(
        values["dovepush_max_retries"],
        s::DEFAULT_MAX_RETRIES.to_string()
    );
    assert_eq!(
        values["dovepush_queue_size"],
        s::DEFAULT_QUEUE_SIZE.to_string()
    );
    assert_eq!(values["dovepush_user_from_metadata"], "no");
    assert_eq!(values["dovepush_debug"], "no");
    // Set by the test kit (into the instance dir) and by the test.
    assert!(values["dovepush_spool_dir"].ends_with("/spool"));
    assert_eq!(values["dovepush_mailboxes"], "INBOX Work");
    assert_eq!(values["dovepush_batch"], "yes");
    // The compiled-in default spool is <statedir>/dovepush-spool, as on 2.3.
    let (ok, out, _) = doveconf(
        d13,
        &d13.root.join("etc/dovecot/dovecot.conf"),
        &["dovepush_spool_dir"],
    );
    assert!(ok);
    assert_eq!(
        out.trim(),
        "dovepush_spool_dir = /var/lib/dovecot/dovepush-spool"
    );
}

#[test]
fn an_unknown_or_bad_dovepush_setting_fails_the_config_check_naming_it() {
    let Some(d13) = root() else { return };
    let sink = Sink::start();
    let mut dovecot = dovecot_with_dovepush(d13, &sink.url(None), &[]);
    dovecot.stop();
    let config = std::fs::read_to_string(dovecot.config_path()).unwrap();
    for (line, named) in [
        (
            "dovepush_max_retry = 2",
            "dovepush_max_retry: Unknown setting",
        ),
        ("dovepush_max_retries = many", "dovepush_max_retries"),
        ("dovepush_timeout_msecs = 2000", "dovepush_timeout_msecs"),
        (
            "dovepush_url2 = http://h/",
            "dovepush_url2: Unknown setting",
        ),
        ("dovepush_url = ftp://h/", "dovepush_url"),
        ("dovepush ox {\n  ox_url = http://h/\n}", "ox_url"),
    ] {
        std::fs::write(dovecot.config_path(), format!("{config}{line}\n")).unwrap();
        let (ok, _, err) = doveconf(d13, dovecot.config_path(), &["-n"]);
        assert!(!ok && err.contains(named), "{line}: doveconf said {err}");
        let started = dovecot.restart();
        let error = started.expect_err(line).to_string();
        assert!(error.contains(named), "{line}: dovecot said {error}");
    }
    // And back to a good config: it starts.
    std::fs::write(dovecot.config_path(), config).unwrap();
    dovecot.restart().unwrap();
}

#[test]
fn named_endpoints_as_migrated_from_the_stock_ox_block() {
    let Some(d13) = root() else { return };
    let ox = Sink::start();
    let ours = Sink::start();
    // What `push_notification ox { ox_url = …  ox_user_from_metadata = yes }` becomes,
    // next to a second receiver that takes the global settings.
    let blocks = format!(
        "dovepush ox {{\n  url = {}\n  user_from_metadata = yes\n  max_retries = 2\n}}\n\
         dovepush receiver {{\n  url = {}\n}}\n",
        ox.url(Some("ox:pw")),
        ours.url(None)
    );
    let dovecot = Dovecot::start(Options {
        delivery_plugins: "notify dovepush".into(),
        dovepush_module: Some(d13.plugin.clone()),
        plugin_settings: vec![("dovepush_timeout_msecs".into(), "3s".into())],
        extra_config: blocks,
        debian13: Some(d13),
        ..Options::default()
    })
    .unwrap();
    dovecot
        .set_subscription("alice", Some("events=x\tuser=3@2"))
        .unwrap();
    dovecot
        .lmtp()
        .unwrap()
        .deliver(&["alice@example.com"], &messages::simple(1))
        .unwrap();
    let a = ox.wait_for(1, WAIT);
    let b = ours.wait_for(1, WAIT);
    assert_eq!((a.len(), b.len()), (1, 1), "log:\n{}", dovecot.log());
    assert_eq!(a[0].json()["user"], "3@2");
    assert_eq!(a[0].header("authorization"), Some("Basic b3g6cHc="));
    assert_eq!(b[0].json()["user"], "alice@example.com");
    assert_eq!(a[0].event_id(), b[0].event_id(), "one event, one id");
}

/// Badges on 2.4: the plugin in imap as well; an IMAP client reads two of three new
/// mails in one `STORE`, expunges the third and appends an unseen one. The block that
/// takes the badge events (`events = …`) gets one `messageRead`, one `messageExpunge`
/// and one `messageAppend`, with Dovecot's `STATUS INBOX (UNSEEN)`; the ox block
/// (default events) only the deliveries.
#[test]
fn imap_reads_expunges_and_appends_reach_only_the_block_that_takes_them() {
    let Some(d13) = root() else { return };
    let ox = Sink::start();
    let ours = Sink::start();
    let blocks = format!(
        "dovepush ox {{\n  url = {}\n}}\n\
         dovepush receiver {{\n  url = {}\n  events = messageNew messageRead messageExpunge messageAppend\n}}\n",
        ox.url(None),
        ours.url(None)
    );
    let dovecot = Dovecot::start(Options {
        delivery_plugins: "notify dovepush".into(),
        imap_plugins: "notify dovepush".into(),
        dovepush_module: Some(d13.plugin.clone()),
        extra_config: blocks,
        debian13: Some(d13),
        ..Options::default()
    })
    .unwrap();
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let mut lmtp = dovecot.lmtp().unwrap();
    for n in 1..=3 {
        lmtp.deliver(&["alice@example.com"], &messages::simple(n))
            .unwrap();
    }
    assert_eq!(ox.wait_for(3, WAIT).len(), 3, "log:\n{}", dovecot.log());
    assert_eq!(ours.wait_for(3, WAIT).len(), 3);

    let mut imap =
        dovepush_testkit::imap::ImapClient::login(dovecot.imap_port, "alice", "alice-secret")
            .unwrap();
    imap.command("SELECT INBOX").unwrap();
    imap.command("STORE 1:2 +FLAGS.SILENT (\\Seen)").unwrap();
    imap.command("STORE 3 +FLAGS.SILENT (\\Deleted)").unwrap();
    imap.command("EXPUNGE").unwrap();
    let unseen = imap.unseen("INBOX").unwrap();
    assert_eq!(unseen, 0);
    let appended = imap.append("INBOX", "", &messages::simple(4)).unwrap();
    assert_eq!(imap.unseen("INBOX").unwrap(), 1);
    imap.logout().unwrap();

    let got = ours.wait_for(6, WAIT);
    assert_eq!(got.len(), 6, "log:\n{}", dovecot.log());
    // Three commands, three requests: the service may send them in either order.
    let mut badges: Vec<(String, u64)> = got[3..]
        .iter()
        .map(|r| {
            let body = r.json();
            (
                body["event"].as_str().unwrap().to_string(),
                body["unseen"].as_u64().unwrap(),
            )
        })
        .collect();
    badges.sort();
    assert_eq!(
        badges,
        [
            ("messageAppend".to_string(), 1),
            ("messageExpunge".to_string(), u64::from(unseen)),
            ("messageRead".to_string(), 1),
        ]
    );
    let append = got[3..]
        .iter()
        .map(Request::json)
        .find(|b| b["event"] == "messageAppend")
        .unwrap();
    assert_eq!(append["imap-uid"], appended);
    let body = got[3..]
        .iter()
        .map(Request::json)
        .find(|b| b["event"] == "messageExpunge")
        .unwrap();
    assert_eq!(body["user"], "alice");
    assert_eq!(body["imap-uid"], 3);
    assert!(body.get("subject").is_none());
    let seen_by_ox: Vec<String> = ox
        .requests()
        .iter()
        .map(|r| r.json()["event"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(seen_by_ox, ["messageNew"; 3]);
    assert!(complaints(&dovecot.log()).is_empty(), "{}", dovecot.log());
}

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

/// Dovecot 2.4 with the stock ox driver (to `ox`) and dovepush (to `ours`) side by side.
fn dovecot_with_both(d13: &'static Debian13, ox: &Sink, ours: &Sink, users: &[&str]) -> Dovecot {
    let dovecot = Dovecot::start(Options {
        users: users
            .iter()
            .map(|u| (u.to_string(), format!("{u}-secret")))
            .collect(),
        delivery_plugins: "notify push_notification dovepush".into(),
        dovepush_module: Some(d13.plugin.clone()),
        plugin_settings: vec![("dovepush_url".into(), ours.url(Some("u:p")))],
        extra_config: format!(
            "push_notification ox {{\n  ox_url = {}\n}}\n",
            ox.url(Some("u:p"))
        ),
        debian13: Some(d13),
        ..Options::default()
    })
    .unwrap();
    for user in users {
        dovecot
            .set_subscription(user, Some(&format!("user={user}")))
            .unwrap();
    }
    dovecot
}

#[test]
fn bodies_match_the_stock_2_4_ox_driver_field_by_field_for_two_users() {
    let Some(d13) = root() else { return };
    let ox = Sink::start();
    let ours = Sink::start();
    let dovecot = dovecot_with_both(d13, &ox, &ours, &["alice", "bob"]);
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
        lmtp.deliver(&["bob@example.com"], mail).unwrap();
    }
    for user in ["alice", "bob"] {
        let (ok, err) = dovecot.deliver_lda(user, &messages::simple(3)).unwrap();
        assert!(ok, "{err}");
    }
    let n = 2 * (mails.len() + 1);
    let stock = ox.wait_for(n, WAIT);
    let mine = ours.wait_for(n, WAIT);
    assert_eq!((stock.len(), mine.len()), (n, n), "{}", dovecot.log());

    let sorted = |requests: &[Request]| {
        let mut bodies: Vec<serde_json::Value> = requests.iter().map(|r| r.json()).collect();
        bodies.sort_by_key(|b| {
            (
                b["user"]
                    .as_str()
                    .unwrap_or("")
                    .trim_end_matches("@example.com")
                    .to_string(),
                b["imap-uid"].as_u64(),
            )
        });
        bodies
    };
    let (stock_bodies, my_bodies) = (sorted(&stock), sorted(&mine));
    for (s, m) in stock_bodies.iter().zip(&my_bodies) {
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
    let users: HashSet<&str> = my_bodies
        .iter()
        .map(|b| b["user"].as_str().unwrap())
        .collect();
    assert_eq!(
        users,
        HashSet::from(["alice@example.com", "bob@example.com", "alice", "bob"])
    );
    // Same request line and headers, apart from dovepush's event id.
    let (s, m) = (&stock[0], &mine[0]);
    assert_eq!((&s.method, &s.path), (&m.method, &m.path));
    assert_eq!(s.header("authorization"), m.header("authorization"));
    assert_eq!(s.header("content-type"), m.header("content-type"));
}

#[test]
fn concurrent_maildir_deliveries_dovepush_sends_no_uid_0_where_the_stock_driver_does() {
    let Some(d13) = root() else { return };
    let ox = Sink::start();
    let ours = Sink::start();
    let mut dovecot = dovecot_with_both(d13, &ox, &ours, &["alice"]);
    // lmtp processes that serve many connections (2.4.1's default is one each, see
    // below): dovepush lets lmtp answer and gives the mails the try-lock left without a
    // UID their UIDs afterwards; the stock driver in the same transaction sends 0.
    let config = std::fs::read_to_string(dovecot.config_path()).unwrap();
    let config = config.replacen(
        "service lmtp {\n",
        "service lmtp {\n  restart_request_count = unlimited\n",
        1,
    );
    std::fs::write(dovecot.config_path(), config).unwrap();
    dovecot.restart().expect("restarting Dovecot");
    let per_connection = 100;
    std::thread::scope(|scope| {
        for c in 0..4 {
            let dovecot = &dovecot;
            scope.spawn(move || {
                let mut lmtp = dovecot.lmtp().unwrap();
                for n in 0..per_connection {
                    lmtp.deliver(&["alice@example.com"], &messages::simple(c * 1000 + n))
                        .unwrap();
                }
            });
        }
    });
    let n = 4 * per_connection;
    let mine = ours.wait_for(n, WAIT);
    let stock = ox.wait_for(n, WAIT);
    assert_eq!((mine.len(), stock.len()), (n, n), "{}", dovecot.log());
    let uids: HashSet<u64> = mine
        .iter()
        .map(|r| r.json()["imap-uid"].as_u64().unwrap())
        .collect();
    assert!(!uids.contains(&0), "{}", dovecot.log());
    assert_eq!(uids.len(), n, "distinct UIDs");
    let stock_zeros = stock.iter().filter(|r| r.json()["imap-uid"] == 0).count();
    eprintln!(
        "stock 2.4.1 ox driver: {stock_zeros} of {n} notifications with imap-uid 0; dovepush: 0"
    );
    assert!(
        stock_zeros > 0,
        "the try-lock never failed: this run did not test what it should"
    );

    // Each notified UID opens the mail that was notified (its number ends the subject).
    let fetched = dovecot
        .doveadm(&[
            "fetch",
            "-u",
            "alice",
            "uid hdr.message-id",
            "mailbox",
            "INBOX",
            "all",
        ])
        .unwrap();
    assert!(fetched.status.success(), "{fetched:?}");
    let listing = String::from_utf8_lossy(&fetched.stdout);
    let mut number_of_uid = HashMap::new();
    let mut uid = None;
    for line in listing.lines() {
        if let Some(v) = line.strip_prefix("uid: ") {
            uid = v.trim().parse::<u64>().ok();
        } else if let Some(v) = line.strip_prefix("hdr.message-id: ") {
            let number: u64 = v
                .trim()
                .trim_start_matches("<m")
                .split('@')
                .next()
                .unwrap()
                .parse()
                .unwrap();
            number_of_uid.insert(uid.take().unwrap(), number);
        }
    }
    assert_eq!(number_of_uid.len(), n, "{listing}");
    for request in &mine {
        let body = request.json();
        let uid = body["imap-uid"].as_u64().unwrap();
        let subject = body["subject"].as_str().unwrap();
        let number: u64 = subject.rsplit(' ').next().unwrap().parse().unwrap();
        assert_eq!(
            number_of_uid.get(&uid),
            Some(&number),
            "UID {uid} is not {subject:?}"
        );
    }
    let log = dovecot.log();
    assert!(complaints(&log).is_empty(), "{log}");
}

#[test]
fn lmtp_processes_that_exit_after_one_connection_send_no_uid_0() {
    let Some(d13) = root() else { return };
    // restart_request_count = 1 (2.3's service_count; 2.4.1's default for lmtp): a
    // process per connection, which exits when the client quits; dovepush asks the
    // storage for UIDs at commit, as in lda.
    let sink = Sink::start();
    let mut dovecot = dovecot_with_dovepush(d13, &sink.url(None), &[]);
    let config = std::fs::read_to_string(dovecot.config_path()).unwrap();
    let config = config.replacen(
        "service lmtp {\n",
        "service lmtp {\n  restart_request_count = 1\n",
        1,
    );
    std::fs::write(dovecot.config_path(), config).unwrap();
    dovecot.restart().expect("restarting Dovecot");
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let per_thread = 15;
    std::thread::scope(|scope| {
        for c in 0..4 {
            let dovecot = &dovecot;
            scope.spawn(move || {
                for n in 0..per_thread {
                    let mut lmtp = dovecot.lmtp().unwrap();
                    lmtp.deliver(&["alice@example.com"], &messages::simple(c * 1000 + n))
                        .unwrap();
                }
            });
        }
    });
    let requests = sink.wait_for(4 * per_thread, WAIT);
    assert_eq!(requests.len(), 4 * per_thread, "{}", dovecot.log());
    let uids: HashSet<u64> = requests
        .iter()
        .map(|r| r.json()["imap-uid"].as_u64().unwrap())
        .collect();
    assert!(!uids.contains(&0), "{}", dovecot.log());
    assert_eq!(uids.len(), 4 * per_thread);
}

#[test]
fn receiver_down_for_50_deliveries_then_up_all_50_event_ids_arrive() {
    let Some(d13) = root() else { return };
    let port = free_port();
    let dovecot = dovecot_with_dovepush(
        d13,
        &url_for(port, None),
        &[
            ("dovepush_spool_retry_interval", "1s"),
            ("dovepush_max_retries", "1"),
        ],
    );
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let mut lmtp = dovecot.lmtp().unwrap();
    for n in 0..50 {
        let latency = lmtp
            .deliver(&["alice@example.com"], &messages::simple(n))
            .unwrap();
        assert!(
            latency < Duration::from_secs(1),
            "delivery {n} took {latency:?}"
        );
    }
    assert!(
        wait_until(WAIT, || dovecot.queued_files().len() == 50),
        "expected 50 queued events, found {}\n{}",
        dovecot.queued_files().len(),
        dovecot.log()
    );
    let sink = Sink::start_on(port).unwrap();
    let ids = || -> HashSet<String> {
        sink.requests()
            .iter()
            .filter_map(|r| r.event_id().map(str::to_string))
            .collect()
    };
    assert!(
        wait_until(WAIT, || ids().len() == 50),
        "only {} arrived\n{}",
        ids().len(),
        dovecot.log()
    );
    let uids: HashSet<u64> = sink
        .requests()
        .iter()
        .map(|r| r.json()["imap-uid"].as_u64().unwrap())
        .collect();
    assert_eq!(uids, (1..=50).collect::<HashSet<u64>>());
    assert!(wait_until(WAIT, || dovecot.queued_files().is_empty()));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(sink.requests().len(), 50, "each event once");
}

#[test]
fn a_receiver_that_sleeps_5s_does_not_slow_lmtp_replies() {
    let Some(d13) = root() else { return };
    let sink = Sink::start();
    sink.set_delay(Duration::from_secs(5));
    let dovecot = dovecot_with_dovepush(d13, &sink.url(None), &[("dovepush_timeout_msecs", "10s")]);
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let mut lmtp = dovecot.lmtp().unwrap();
    let mut worst = Duration::ZERO;
    for n in 0..20 {
        worst = worst.max(
            lmtp.deliver(&["alice@example.com"], &messages::simple(n))
                .unwrap(),
        );
    }
    // The stock ox driver would hold each reply for the whole 5 s exchange.
    assert!(
        worst < Duration::from_secs(1),
        "slowest LMTP reply took {worst:?}"
    );
    let requests = sink.wait_for(20, Duration::from_secs(30));
    assert_eq!(requests.len(), 20, "{}", dovecot.log());
}

#[test]
fn malformed_mail_delivers_and_notifies() {
    let Some(d13) = root() else { return };
    let sink = Sink::start();
    let dovecot = dovecot_with_dovepush(d13, &sink.url(None), &[]);
    dovecot
        .set_subscription("alice", Some("user=alice"))
        .unwrap();
    let mut lmtp = dovecot.lmtp().unwrap();
    for mail in [
        messages::bad_encoded_words(),
        messages::missing_from(),
        messages::huge_subject(),
    ] {
        lmtp.deliver(&["alice@example.com"], &mail).unwrap();
    }
    let (ok, stderr) = dovecot
        .deliver_lda("alice", &messages::huge_subject())
        .unwrap();
    assert!(ok, "{stderr}");
    let requests = sink.wait_for(4, WAIT);
    assert_eq!(requests.len(), 4, "{}", dovecot.log());
    let mut by_uid: Vec<serde_json::Value> = requests.iter().map(|r| r.json()).collect();
    by_uid.sort_by_key(|b| b["imap-uid"].as_u64());
    assert!(by_uid[0]["subject"].as_str().unwrap().contains('\u{fffd}'));
    assert!(
        by_uid[1].get("from").is_none(),
        "no From header, no from key"
    );
    assert_eq!(by_uid[1]["subject"], "no sender");
    for big in &by_uid[2..] {
        let subject = big["subject"].as_str().unwrap();
        assert!(
            subject.len() <= 4096 && subject.starts_with("xxxx"),
            "{}",
            subject.len()
        );
    }
    for r in &requests {
        assert!(r.body.len() < 16 * 1024);
    }
}

#[test]
fn the_shipped_2_4_conf_d_snippet_and_endpoint_file_work_as_is() {
    let Some(d13) = root() else { return };
    let sink = Sink::start();
    let repo = env!("CARGO_MANIFEST_DIR");
    let snippet = std::fs::read_to_string(format!("{repo}/conf.d/2.4/90-dovepush.conf")).unwrap();
    // The endpoint file as an admin would fill it in: one line uncommented.
    let endpoints = std::fs::read_to_string(format!("{repo}/conf.d/2.4/dovepush-endpoints.conf.ext"))
        .unwrap()
        .replace(
            "#dovepush_url = https://dovepush:PASSWORD@push.example.net:8025/preliminary/http-notify/v1/notify",
            &format!("dovepush_url = {}", sink.url(None)),
        );
    assert!(endpoints.contains(&sink.url(None)));
    // Inside the root, where Dovecot reads it.
    let dir = tempfile::tempdir_in(d13.root.join("tmp")).unwrap();
    std::fs::write(dir.path().join("dovepush-endpoints.conf.ext"), endpoints).unwrap();
    let inner = std::path::Path::new("/").join(dir.path().strip_prefix(&d13.root).unwrap());
    // The test kit's service block comes after the snippet's and runs the sender built
    // in the root as its own test user; its module dir holds the built plugin.
    let dovecot = Dovecot::start(Options {
        delivery_plugins: String::new(),
        dovepush_module: Some(d13.plugin.clone()),
        extra_config: format!(
            "{snippet}\n!include {}/dovepush-endpoints.conf.ext\n",
            inner.display()
        ),
        debian13: Some(d13),
        ..Options::default()
    })
    .unwrap();
    dovecot
        .set_subscription("alice", Some("user=alice-login"))
        .unwrap();
    dovecot
        .lmtp()
        .unwrap()
        .deliver(&["alice@example.com"], &messages::simple(1))
        .unwrap();
    let requests = sink.wait_for(1, WAIT);
    assert_eq!(requests.len(), 1, "{}", dovecot.log());
    // The endpoint file turns on user_from_metadata.
    assert_eq!(requests[0].json()["user"], "alice-login");
}
