//! `openapi.yaml` against the real router (the library on port 0): every documented
//! operation is routed and authenticates with the documented scheme, answers a documented
//! status with its documented example, every undocumented method on a documented path is
//! 405 with an `Allow` naming exactly the documented ones, unknown paths are 404, errors
//! have the documented `{"error", "field", "rule"}` shape, and every path the router matches
//! is documented.

mod common;

use std::collections::BTreeSet;

use common::*;
use dovepush_receiver::transport::Transports;
use serde_json::Value;

const SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml");
const ROUTER_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/mod.rs");
const METHODS: [&str; 5] = ["GET", "PUT", "POST", "DELETE", "PATCH"];
/// The batch ingest path that is not below the ox path.
const BATCH_PATH: &str = "/v1/notify/batch";

/// How an operation authenticates, as the document says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Auth {
    None,
    Basic,
    Bearer,
    /// The device API: the user's mail password (Basic) or an OAuth token (Bearer).
    BasicOrBearer,
}

/// One documented path + method.
#[derive(Debug)]
struct Operation {
    /// As documented, e.g. `/v1/devices/{token}`.
    template: String,
    /// With path parameters replaced by their examples.
    path: String,
    method: String,
    auth: Auth,
    /// The `application/json` request example, if any.
    example: Option<Value>,
    /// Documented status codes.
    statuses: BTreeSet<u16>,
    /// Documented responses by status (resolved).
    responses: serde_json::Map<String, Value>,
}

fn spec() -> Value {
    let text = std::fs::read_to_string(SPEC).expect("openapi.yaml is readable");
    serde_saphyr::from_str(&text).expect("openapi.yaml is valid YAML")
}

/// Follows a local `$ref` (`#/components/...`), repeatedly.
fn resolve<'a>(doc: &'a Value, mut v: &'a Value) -> &'a Value {
    while let Some(r) = v.get("$ref").and_then(Value::as_str) {
        let pointer = r
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local $refs are used: {r}"));
        v = doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {r}"));
    }
    v
}

fn auth_of(doc: &Value, op: &Value) -> Auth {
    let requirements = op
        .get("security")
        .or_else(|| doc.get("security"))
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut schemes = BTreeSet::new();
    for requirement in &requirements {
        for name in requirement
            .as_object()
            .expect("security requirement")
            .keys()
        {
            let scheme = doc
                .pointer(&format!("/components/securitySchemes/{name}"))
                .unwrap_or_else(|| panic!("undefined security scheme {name}"));
            assert_eq!(scheme["type"], "http", "{name}");
            schemes.insert(scheme["scheme"].as_str().unwrap().to_ascii_lowercase());
        }
    }
    match schemes.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        [] => Auth::None,
        ["basic"] => Auth::Basic,
        ["bearer"] => Auth::Bearer,
        ["basic", "bearer"] => Auth::BasicOrBearer,
        ref other => panic!("unexpected security schemes {other:?}"),
    }
}

fn operations(doc: &Value) -> Vec<Operation> {
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.0."),
        "OpenAPI 3.0"
    );
    let mut ops = Vec::new();
    for (template, item) in doc["paths"].as_object().expect("paths") {
        let item = resolve(doc, item);
        for (method, op) in item.as_object().unwrap() {
            let method = method.to_ascii_uppercase();
            if !METHODS.contains(&method.as_str()) {
                assert!(
                    ["PARAMETERS", "SUMMARY", "DESCRIPTION"].contains(&method.as_str()),
                    "unexpected key {method} under {template}"
                );
                continue;
            }
            let mut path = template.clone();
            for p in op["parameters"].as_array().into_iter().flatten() {
                let p = resolve(doc, p);
                if p["in"] == "path" {
                    let example = p["example"].as_str().unwrap_or_else(|| {
                        panic!("{method} {template}: path parameter without example")
                    });
                    path = path.replace(&format!("{{{}}}", p["name"].as_str().unwrap()), example);
                }
            }
            assert!(
                !path.contains('{'),
                "{method} {template}: undeclared path parameter"
            );
            let example = op
                .get("requestBody")
                .map(|b| resolve(doc, b))
                .and_then(|b| b.pointer("/content/application~1json/example"))
                .cloned();
            let responses: serde_json::Map<String, Value> = op["responses"]
                .as_object()
                .unwrap_or_else(|| panic!("{method} {template}: no responses"))
                .iter()
                .map(|(k, v)| (k.clone(), resolve(doc, v).clone()))
                .collect();
            let statuses = responses
                .keys()
                .map(|k| k.parse().unwrap_or_else(|_| panic!("status code {k}")))
                .collect();
            ops.push(Operation {
                template: template.clone(),
                path,
                method,
                auth: auth_of(doc, op),
                example,
                statuses,
                responses,
            });
        }
    }
    ops
}

/// The error shape every error answer has: `error` (string) and optionally `field`.
fn assert_error_shape(what: &str, reply: &Reply) {
    let content_type = reply.headers["content-type"].to_str().unwrap();
    assert_eq!(content_type, "application/json", "{what}");
    let v = reply.json();
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("{what}: {v} is not an object"));
    assert!(obj["error"].is_string(), "{what}: {v}");
    for (k, val) in obj {
        assert!(
            k == "error" || ((k == "field" || k == "rule") && val.is_string()),
            "{what}: {v}"
        );
    }
}

/// The VAPID public key the documented example shows (RFC 8291's application server key).
const VAPID_KEY: &str =
    "BP4z9KsN6nGRTbVYI_c7VJSPQTBtkgcy27mlmlMoZIIgDll6e3vCYLocInmYWAmS6TlzAC8wEqKK6PBru3jl7A8";

async fn start(dir: &std::path::Path) -> Running {
    let mail = FakeMail::with_users(&[("alice", "alice-pw")]);
    let directory = mail.clone();
    let transports = Transports::new().with_vapid_key("mail", VAPID_KEY);
    Running::start_with_directory(config(dir, ""), transports, mail, Some(directory)).await
}

fn body_of(op: &Operation) -> String {
    op.example
        .as_ref()
        .map(Value::to_string)
        .unwrap_or_default()
}

#[test]
fn the_error_schema_is_error_field_and_rule() {
    let doc = spec();
    let error = &doc["components"]["schemas"]["Error"];
    let keys: BTreeSet<_> = error["properties"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        keys,
        BTreeSet::from(["error".into(), "field".into(), "rule".into()])
    );
    assert_eq!(error["required"], serde_json::json!(["error"]));
    // Every documented error response of a JSON endpoint uses it.
    for op in operations(&doc) {
        for (status, response) in &op.responses {
            if status.starts_with('4') || status.starts_with('5') {
                assert_eq!(
                    response.pointer("/content/application~1json/schema/$ref"),
                    Some(&Value::from("#/components/schemas/Error")),
                    "{} {} {status}",
                    op.method,
                    op.template
                );
            }
        }
    }
}

#[tokio::test]
async fn every_documented_operation_is_routed_and_authenticated_as_documented() {
    let doc = spec();
    let ops = operations(&doc);
    assert!(ops.len() >= 8, "{ops:#?}");
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    for op in &ops {
        let what = format!("{} {} (no credentials)", op.method, op.path);
        let reply = request(r.addr, &op.method, &op.path, &[], body_of(op)).await;
        assert_ne!(reply.status, 404, "{what}: {}", reply.text());
        assert_ne!(reply.status, 405, "{what}: {}", reply.text());
        assert!(
            op.statuses.contains(&reply.status),
            "{what}: {} is not documented",
            reply.status
        );
        match op.auth {
            Auth::None => assert_eq!(reply.status, 200, "{what}"),
            Auth::Basic | Auth::Bearer | Auth::BasicOrBearer => {
                assert_eq!(reply.status, 401, "{what}: {}", reply.text());
                let challenge = reply.headers["www-authenticate"].to_str().unwrap();
                let scheme = if op.auth == Auth::Bearer {
                    "Bearer "
                } else {
                    "Basic "
                };
                assert!(challenge.starts_with(scheme), "{what}: {challenge}");
                assert_error_shape(&what, &reply);
            }
        }
    }
    r.stop().await;
}

#[tokio::test]
async fn documented_examples_get_documented_answers() {
    let doc = spec();
    let mut ops = operations(&doc);
    // Register before listing and removing.
    ops.sort_by_key(|op| match op.method.as_str() {
        "PUT" | "POST" => 0,
        "GET" => 1,
        _ => 2,
    });
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let notify = notify_auth();
    let alice = basic("alice", "alice-pw");
    let admin = bearer();
    for op in &ops {
        let what = format!("{} {}", op.method, op.path);
        let authorization = match op.auth {
            Auth::None => None,
            Auth::Bearer => Some(admin.as_str()),
            Auth::Basic if op.template.starts_with(NOTIFY_PATH) || op.template == BATCH_PATH => {
                Some(notify.as_str())
            }
            Auth::Basic | Auth::BasicOrBearer => Some(alice.as_str()),
        };
        let mut headers = vec![("content-type", "application/json")];
        headers.extend(authorization.map(|a| ("authorization", a)));
        let reply = request(r.addr, &op.method, &op.path, &headers, body_of(op)).await;
        assert!(
            (200..300).contains(&reply.status),
            "{what}: {} {}",
            reply.status,
            reply.text()
        );
        let documented = op
            .responses
            .get(&reply.status.to_string())
            .unwrap_or_else(|| panic!("{what}: {} is not documented", reply.status));
        match documented.get("content").and_then(Value::as_object) {
            None => assert!(reply.body.is_empty(), "{what}: body {}", reply.text()),
            Some(content) => {
                let media = reply.headers["content-type"].to_str().unwrap();
                let (documented_media, spec) = content
                    .iter()
                    .find(|(m, _)| media.starts_with(m.as_str()))
                    .unwrap_or_else(|| panic!("{what}: content-type {media} is not documented"));
                if documented_media == "application/json" {
                    check_required(&doc, &what, &spec["schema"], &reply.json());
                }
            }
        }
    }
    r.stop().await;
}

/// A shallow schema check: the type, and the required properties of objects (also of
/// array items).
fn check_required(doc: &Value, what: &str, schema: &Value, value: &Value) {
    let schema = resolve(doc, schema);
    if value.is_null() && schema["nullable"] == true {
        return;
    }
    match schema["type"].as_str() {
        Some("object") => {
            let obj = value
                .as_object()
                .unwrap_or_else(|| panic!("{what}: expected an object, got {value}"));
            for key in schema["required"].as_array().into_iter().flatten() {
                let key = key.as_str().unwrap();
                assert!(obj.contains_key(key), "{what}: {key} missing in {value}");
                if let Some(sub) = schema["properties"].get(key) {
                    check_required(doc, what, sub, &obj[key]);
                }
            }
        }
        Some("array") => {
            for item in value
                .as_array()
                .unwrap_or_else(|| panic!("{what}: expected an array, got {value}"))
            {
                check_required(doc, what, &schema["items"], item);
            }
        }
        Some("string") => assert!(value.is_string(), "{what}: {value}"),
        Some("boolean") => assert!(value.is_boolean(), "{what}: {value}"),
        Some("integer") => assert!(value.is_u64() || value.is_i64(), "{what}: {value}"),
        _ => {}
    }
}

#[tokio::test]
async fn undocumented_methods_are_405_with_the_documented_allow() {
    let doc = spec();
    let ops = operations(&doc);
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let paths: BTreeSet<&str> = ops.iter().map(|op| op.path.as_str()).collect();
    for path in paths {
        let documented: BTreeSet<&str> = ops
            .iter()
            .filter(|op| op.path == path)
            .map(|op| op.method.as_str())
            .collect();
        for method in METHODS.iter().filter(|m| !documented.contains(*m)) {
            let what = format!("{method} {path}");
            let reply = request(r.addr, method, path, &[], "").await;
            assert_eq!(reply.status, 405, "{what}: {}", reply.text());
            let allow: BTreeSet<&str> = reply.headers["allow"]
                .to_str()
                .unwrap()
                .split(',')
                .map(str::trim)
                .collect();
            assert_eq!(allow, documented, "{what}: Allow");
            assert_error_shape(&what, &reply);
        }
    }
    r.stop().await;
}

#[tokio::test]
async fn unknown_paths_are_404() {
    let dir = tempfile::tempdir().unwrap();
    let r = start(dir.path()).await;
    let admin = bearer();
    for path in [
        "/",
        "/v1",
        "/v1/device",
        "/v1/devicesx",
        "/v1/apps/mail",
        "/v1/apps//vapid",
        "/v1/apps/mail/vapid/x",
        "/v1/apps/a/b/vapid",
        "/v1/status",
        "/v1/status/subscriptions/alice",
        "/metrics/",
        "/healthz/x",
        "/preliminary/http-notify/v1",
        "/preliminary/http-notify/v1/notify/x",
        "/openapi.yaml",
    ] {
        for method in ["GET", "PUT"] {
            let what = format!("{method} {path}");
            let reply = request(r.addr, method, path, &[("authorization", &admin)], "").await;
            assert_eq!(reply.status, 404, "{what}: {}", reply.text());
            assert_error_shape(&what, &reply);
        }
    }
    r.stop().await;
}

/// The path literals `route()` in `src/http/mod.rs` matches, plus the ingest path constant.
/// A literal ending in `/` is a prefix route (`/v1/devices/{token}`,
/// `/v1/apps/{app}/vapid`).
///
/// Reads the router's source because the routes are a `match`, not data; when `http`
/// exposes a route table, compare against that instead.
fn router_paths() -> BTreeSet<String> {
    let source = std::fs::read_to_string(ROUTER_SOURCE).expect("router source");
    let start = source
        .find("pub async fn route(")
        .expect("src/http/mod.rs has `pub async fn route(`");
    let body = &source[start..];
    let body = &body[..body.find("\n}\n").expect("end of route()")];
    let mut paths: BTreeSet<String> = body
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|literal| literal.starts_with('/'))
        .map(str::to_owned)
        .collect();
    assert!(
        body.contains("notify::PATH"),
        "route() no longer uses notify::PATH: update this test"
    );
    paths.insert(dovepush_receiver::http::notify::PATH.to_owned());
    paths
}

#[test]
fn every_router_path_is_documented() {
    let doc = spec();
    let documented: Vec<&String> = doc["paths"].as_object().unwrap().keys().collect();
    let routed = router_paths();
    assert!(routed.len() >= 6, "{routed:?}");
    for path in &routed {
        let covered = documented.iter().any(|d| match path.strip_suffix('/') {
            // A prefix route: documented as `<prefix>{param}`, perhaps with more after it.
            Some(_) => d.strip_prefix(path.as_str()).is_some_and(|rest| {
                let param = rest.split('/').next().unwrap_or_default();
                param.starts_with('{') && param.ends_with('}')
            }),
            None => d.as_str() == path,
        });
        assert!(covered, "the router matches {path}, openapi.yaml lacks it");
    }
    // And nothing documented is unknown to the router.
    for d in documented {
        let known = routed.iter().any(|path| match path.strip_suffix('/') {
            Some(_) => d.starts_with(path.as_str()),
            None => d == path,
        });
        assert!(
            known,
            "openapi.yaml documents {d}, the router does not match it"
        );
    }
}
