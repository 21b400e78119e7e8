//! Keeping user-supplied Web Push endpoints out of the operator's network (SSRF).
//!
//! A Web Push endpoint is a URL the *user* hands in, and the receiver POSTs to it. So:
//! * [`classify`] sorts an address into its class (loopback, private, link-local, CGNAT,
//!   cloud metadata, …); IPv4-mapped, IPv4-compatible, NAT64 and 6to4 IPv6 addresses are
//!   judged by the IPv4 address they carry.
//! * [`AddressPolicy`] says which classes are refused: everything but public unicast
//!   (unless `deny_private = false`, for labs and tests), cloud metadata always, and nothing
//!   for a host the operator lists in `allow_hosts`.
//! * [`check_host`] applies it at registration (IP literals and every address a name
//!   resolves to, through the injected [`Resolve`]r).
//! * [`GuardedResolver`] applies it again at send time, inside hyper-util's connector: a
//!   name resolves, refused addresses are dropped, and the connection goes only to the
//!   addresses that passed, so a DNS answer that changed since registration (rebinding)
//!   cannot reach a private address.

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use hyper_util::client::legacy::connect::dns::Name;

/// What kind of address an IP address is, as far as reaching it from the receiver goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressClass {
    /// Public unicast: the only class a push endpoint may use by default.
    Public,
    Loopback,
    /// RFC 1918 IPv4, IPv6 unique-local (fc00::/7) and deprecated site-local.
    Private,
    LinkLocal,
    /// 100.64.0.0/10, carrier-grade NAT.
    SharedCgnat,
    /// 0.0.0.0/8 and `::`.
    Unspecified,
    Multicast,
    Broadcast,
    /// Cloud instance metadata services (169.254.169.254, fd00:ec2::254, 100.100.100.200).
    Metadata,
    /// Documentation ranges (TEST-NET, 2001:db8::/32).
    Documentation,
    /// Anything else that is not public unicast (240.0.0.0/4, benchmarking, IETF protocol
    /// assignments, Teredo, discard-only, outside 2000::/3, …).
    Reserved,
}

impl AddressClass {
    /// The words used in refusals: `loopback`, `private`, `link-local`, …
    pub fn as_str(self) -> &'static str {
        match self {
            AddressClass::Public => "public",
            AddressClass::Loopback => "loopback",
            AddressClass::Private => "private",
            AddressClass::LinkLocal => "link-local",
            AddressClass::SharedCgnat => "shared (carrier-grade NAT)",
            AddressClass::Unspecified => "unspecified",
            AddressClass::Multicast => "multicast",
            AddressClass::Broadcast => "broadcast",
            AddressClass::Metadata => "cloud metadata",
            AddressClass::Documentation => "documentation",
            AddressClass::Reserved => "reserved",
        }
    }
}

impl AddressClass {
    /// The class as a stable machine word (what the receiver's refusals carry as `rule`):
    /// `loopback`, `private`, `link-local`, `cgnat`, `unspecified`, `multicast`,
    /// `broadcast`, `metadata`, `documentation`, `reserved` (or `public`).
    pub fn rule(self) -> &'static str {
        match self {
            AddressClass::SharedCgnat => "cgnat",
            AddressClass::Metadata => "metadata",
            other => other.as_str(),
        }
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The class of `ip`.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn in_v4(ip: Ipv4Addr, net: [u8; 4], prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    const METADATA: [[u8; 4]; 2] = [[169, 254, 169, 254], [100, 100, 100, 200]];
    if METADATA.contains(&ip.octets()) {
        return AddressClass::Metadata;
    }
    let ranges: [([u8; 4], u32, AddressClass); 16] = [
        ([0, 0, 0, 0], 8, AddressClass::Unspecified),
        ([127, 0, 0, 0], 8, AddressClass::Loopback),
        ([10, 0, 0, 0], 8, AddressClass::Private),
        ([172, 16, 0, 0], 12, AddressClass::Private),
        ([192, 168, 0, 0], 16, AddressClass::Private),
        ([169, 254, 0, 0], 16, AddressClass::LinkLocal),
        ([100, 64, 0, 0], 10, AddressClass::SharedCgnat),
        ([192, 0, 0, 0], 24, AddressClass::Reserved),
        ([192, 0, 2, 0], 24, AddressClass::Documentation),
        ([198, 51, 100, 0], 24, AddressClass::Documentation),
        ([203, 0, 113, 0], 24, AddressClass::Documentation),
        ([198, 18, 0, 0], 15, AddressClass::Reserved),
        ([192, 88, 99, 0], 24, AddressClass::Reserved),
        ([255, 255, 255, 255], 32, AddressClass::Broadcast),
        ([224, 0, 0, 0], 4, AddressClass::Multicast),
        ([240, 0, 0, 0], 4, AddressClass::Reserved),
    ];
    ranges
        .iter()
        .find(|(net, prefix, _)| in_v4(ip, *net, *prefix))
        .map_or(AddressClass::Public, |(_, _, class)| *class)
}

fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, prefix: u32) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - prefix)
    };
    u128::from(ip) & mask == u128::from(net) & mask
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    let bits = u128::from(ip);
    let low_v4 = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
    if ip == Ipv6Addr::UNSPECIFIED {
        return AddressClass::Unspecified;
    }
    if ip == Ipv6Addr::LOCALHOST {
        return AddressClass::Loopback;
    }
    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return AddressClass::Metadata;
    }
    let v6 = |s: &str| s.parse::<Ipv6Addr>().unwrap_or(Ipv6Addr::UNSPECIFIED);
    // IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d) and the NAT64 well-known
    // prefix carry an IPv4 address: the IPv4 rules decide.
    if in_v6(ip, v6("::ffff:0:0"), 96) || in_v6(ip, v6("::"), 96) {
        return classify_v4(low_v4);
    }
    if in_v6(ip, v6("64:ff9b::"), 96) {
        return classify_v4(low_v4);
    }
    // 6to4: 2002:AABB:CCDD::/48 reaches AA.BB.CC.DD.
    if in_v6(ip, v6("2002::"), 16) {
        return classify_v4(Ipv4Addr::from(((bits >> 80) & 0xffff_ffff) as u32));
    }
    let ranges: [(&str, u32, AddressClass); 10] = [
        ("64:ff9b:1::", 48, AddressClass::Private),
        ("fc00::", 7, AddressClass::Private),
        ("fec0::", 10, AddressClass::Private),
        ("fe80::", 10, AddressClass::LinkLocal),
        ("ff00::", 8, AddressClass::Multicast),
        ("2001:db8::", 32, AddressClass::Documentation),
        ("100::", 64, AddressClass::Reserved),
        ("2001::", 32, AddressClass::Reserved),
        ("2001:10::", 28, AddressClass::Reserved),
        ("2001:20::", 28, AddressClass::Reserved),
    ];
    if let Some((_, _, class)) = ranges
        .iter()
        .find(|(net, prefix, _)| in_v6(ip, v6(net), *prefix))
    {
        return *class;
    }
    if in_v6(ip, v6("2000::"), 3) {
        AddressClass::Public
    } else {
        AddressClass::Reserved
    }
}

/// Which endpoint addresses the receiver refuses (`[webpush] allow_hosts`,
/// `deny_private`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Lower-case host names or IP literals (no brackets) that are never checked.
    allow_hosts: Vec<String>,
    deny_private: bool,
}

impl Default for AddressPolicy {
    /// Refuse everything but public unicast; allow no host explicitly.
    fn default() -> Self {
        AddressPolicy {
            allow_hosts: Vec::new(),
            deny_private: true,
        }
    }
}

impl AddressPolicy {
    /// `allow_hosts` are exact host names or IP addresses (case-insensitive; IPv6 with
    /// or without brackets). With `deny_private = false` only cloud metadata addresses
    /// are refused.
    pub fn new<S: AsRef<str>>(
        allow_hosts: impl IntoIterator<Item = S>,
        deny_private: bool,
    ) -> Self {
        AddressPolicy {
            allow_hosts: allow_hosts
                .into_iter()
                .map(|h| normalise_host(h.as_ref()))
                .collect(),
            deny_private,
        }
    }

    /// Whether the operator listed `host` in `allow_hosts` (then no address check applies).
    pub fn host_allowed(&self, host: &str) -> bool {
        let host = normalise_host(host);
        self.allow_hosts.contains(&host)
    }

    /// The class that makes `ip` refused, or `None` if it may be reached.
    pub fn refusal(&self, ip: IpAddr) -> Option<AddressClass> {
        match classify(ip) {
            AddressClass::Public => None,
            AddressClass::Metadata => Some(AddressClass::Metadata),
            _ if !self.deny_private => None,
            class => Some(class),
        }
    }
}

fn normalise_host(host: &str) -> String {
    host.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// Why an endpoint host may not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointRefused {
    /// The URL names an address of a refused class.
    #[error(
        "the endpoint's host {address} is a {class} address, which push endpoints may not use"
    )]
    Literal {
        address: IpAddr,
        class: AddressClass,
    },
    /// The name resolves to an address of a refused class.
    #[error(
        "the endpoint's host {host} resolves to {address} ({class}), which push endpoints may not use"
    )]
    Resolved {
        host: String,
        address: IpAddr,
        class: AddressClass,
    },
    /// The name does not resolve.
    #[error("the endpoint's host {host} cannot be resolved: {message}")]
    Unresolvable { host: String, message: String },
}

impl EndpointRefused {
    /// The rule that refused the endpoint, as a machine word: the address class
    /// ([`AddressClass::rule`]) or `unresolvable`.
    pub fn rule(&self) -> &'static str {
        match self {
            EndpointRefused::Literal { class, .. } | EndpointRefused::Resolved { class, .. } => {
                class.rule()
            }
            EndpointRefused::Unresolvable { .. } => "unresolvable",
        }
    }
}

/// Resolves host names to addresses: the system resolver in production
/// ([`SystemResolver`]), a fixed table in tests.
pub trait Resolve: Send + Sync {
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>>;
}

/// The system's resolver (`getaddrinfo` through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host, 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// An IP literal host (`127.0.0.1`, `[::1]`), if `host` is one.
pub(crate) fn ip_literal(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Checks the host of an endpoint at registration: an allowed host passes; an IP literal
/// must not be refused; a name must resolve, and to no refused address at all.
pub async fn check_host(
    host: &str,
    policy: &AddressPolicy,
    resolver: &dyn Resolve,
) -> Result<(), EndpointRefused> {
    if policy.host_allowed(host) {
        return Ok(());
    }
    if let Some(address) = ip_literal(host) {
        return match policy.refusal(address) {
            Some(class) => Err(EndpointRefused::Literal { address, class }),
            None => Ok(()),
        };
    }
    let unresolvable = |message: String| EndpointRefused::Unresolvable {
        host: host.to_owned(),
        message,
    };
    let addresses = resolver
        .lookup(host)
        .await
        .map_err(|e| unresolvable(e.to_string()))?;
    if addresses.is_empty() {
        return Err(unresolvable("no addresses".to_owned()));
    }
    for address in addresses {
        if let Some(class) = policy.refusal(address) {
            return Err(EndpointRefused::Resolved {
                host: host.to_owned(),
                address,
                class,
            });
        }
    }
    Ok(())
}

/// hyper-util's resolver for the Web Push client: resolves through the injected
/// [`Resolve`]r and passes on only the addresses the policy allows (all of them for an
/// allowed host). When none is left the connection fails with [`EndpointRefused`].
#[derive(Clone)]
pub(crate) struct GuardedResolver {
    pub(crate) policy: Arc<AddressPolicy>,
    pub(crate) resolver: Arc<dyn Resolve>,
}

impl tower_service::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = EndpointRefused;
    type Future = BoxFuture<'static, Result<Self::Response, EndpointRefused>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), EndpointRefused>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let policy = self.policy.clone();
        let resolver = self.resolver.clone();
        Box::pin(async move {
            let host = name.as_str();
            let addresses =
                resolver
                    .lookup(host)
                    .await
                    .map_err(|e| EndpointRefused::Unresolvable {
                        host: host.to_owned(),
                        message: e.to_string(),
                    })?;
            let allowed = policy.host_allowed(host);
            let mut first_refused = None;
            let passed: Vec<SocketAddr> = addresses
                .into_iter()
                .filter(|ip| match policy.refusal(*ip) {
                    Some(class) if !allowed => {
                        first_refused.get_or_insert((*ip, class));
                        false
                    }
                    _ => true,
                })
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            match (passed.is_empty(), first_refused) {
                (false, _) => Ok(passed.into_iter()),
                (true, Some((address, class))) => Err(EndpointRefused::Resolved {
                    host: host.to_owned(),
                    address,
                    class,
                }),
                (true, None) => Err(EndpointRefused::Unresolvable {
                    host: host.to_owned(),
                    message: "no addresses".to_owned(),
                }),
            }
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A resolver answering from a fixed table (unknown names fail).
    pub(crate) struct FixedResolver(pub HashMap<String, Vec<IpAddr>>);

    impl FixedResolver {
        pub(crate) fn new(entries: &[(&str, &str)]) -> Self {
            let mut map: HashMap<String, Vec<IpAddr>> = HashMap::new();
            for (host, ip) in entries {
                map.entry(host.to_string())
                    .or_default()
                    .push(ip.parse().unwrap());
            }
            FixedResolver(map)
        }
    }

    impl Resolve for FixedResolver {
        fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, io::Result<Vec<IpAddr>>> {
            let found = self.0.get(host).cloned();
            Box::pin(async move {
                found.ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "unknown host"))
            })
        }
    }

    fn class(s: &str) -> AddressClass {
        classify(s.parse().unwrap())
    }

    #[test]
    fn ipv4_classes() {
        use AddressClass::*;
        for (ip, expected) in [
            ("8.8.8.8", Public),
            ("142.250.1.1", Public),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("10.1.2.3", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("172.32.0.1", Public),
            ("192.168.1.1", Private),
            ("169.254.1.1", LinkLocal),
            ("169.254.169.254", Metadata),
            ("100.100.100.200", Metadata),
            ("100.64.0.1", SharedCgnat),
            ("100.128.0.1", Public),
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("224.0.0.1", Multicast),
            ("255.255.255.255", Broadcast),
            ("240.0.0.1", Reserved),
            ("192.0.2.10", Documentation),
            ("198.18.0.1", Reserved),
            ("192.0.0.8", Reserved),
        ] {
            assert_eq!(class(ip), expected, "{ip}");
        }
    }

    #[test]
    fn ipv6_classes_and_embedded_ipv4() {
        use AddressClass::*;
        for (ip, expected) in [
            ("2a00:1450:4001::200e", Public),
            ("::1", Loopback),
            ("::", Unspecified),
            ("fd00:ec2::254", Metadata),
            ("fd12:3456::1", Private),
            ("fc00::1", Private),
            ("fe80::1", LinkLocal),
            ("fec0::1", Private),
            ("ff02::1", Multicast),
            ("2001:db8::1", Documentation),
            ("2001::1", Reserved),
            ("100::1", Reserved),
            ("4000::1", Reserved),
            // IPv4-mapped: the IPv4 rules.
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.1.2.3", Private),
            ("::ffff:169.254.169.254", Metadata),
            ("::ffff:8.8.8.8", Public),
            // IPv4-compatible (deprecated) and NAT64.
            ("::127.0.0.1", Loopback),
            ("64:ff9b::10.0.0.1", Private),
            ("64:ff9b::8.8.8.8", Public),
            ("64:ff9b:1::1", Private),
            // 6to4 of a private and a public address.
            ("2002:0a00:0001::1", Private),
            ("2002:0808:0808::1", Public),
        ] {
            assert_eq!(class(ip), expected, "{ip}");
        }
    }

    #[test]
    fn policy_refuses_private_unless_allowed_or_lab_mode() {
        let strict = AddressPolicy::default();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(strict.refusal(ip("10.0.0.1")), Some(AddressClass::Private));
        assert_eq!(strict.refusal(ip("1.1.1.1")), None);
        let lab = AddressPolicy::new(["Push.Example.", "[::1]"], false);
        assert_eq!(lab.refusal(ip("10.0.0.1")), None);
        assert_eq!(lab.refusal(ip("127.0.0.1")), None);
        // Metadata stays refused in lab mode; only allow_hosts lets it through.
        assert_eq!(
            lab.refusal(ip("169.254.169.254")),
            Some(AddressClass::Metadata)
        );
        assert!(lab.host_allowed("push.example"));
        assert!(lab.host_allowed("::1"));
        assert!(lab.host_allowed("[::1]"));
        assert!(!lab.host_allowed("other.example"));
    }

    #[tokio::test]
    async fn registration_check_resolves_names() {
        let resolver = FixedResolver::new(&[
            ("push.example", "142.250.1.1"),
            ("evil.example", "10.1.2.3"),
            ("mixed.example", "142.250.1.1"),
            ("mixed.example", "127.0.0.1"),
            ("localhost", "127.0.0.1"),
            ("localhost", "::1"),
        ]);
        let policy = AddressPolicy::default();
        let check = |host: &'static str| {
            let policy = policy.clone();
            let resolver = &resolver;
            async move { check_host(host, &policy, resolver).await }
        };
        assert_eq!(check("push.example").await, Ok(()));
        let err = check("evil.example").await.unwrap_err();
        assert_eq!(err.rule(), "private");
        assert_eq!(
            err.to_string(),
            "the endpoint's host evil.example resolves to 10.1.2.3 (private), which push \
             endpoints may not use"
        );
        assert!(matches!(
            check("mixed.example").await,
            Err(EndpointRefused::Resolved {
                class: AddressClass::Loopback,
                ..
            })
        ));
        assert!(matches!(
            check("localhost").await,
            Err(EndpointRefused::Resolved { .. })
        ));
        assert!(matches!(
            check("127.0.0.1").await,
            Err(EndpointRefused::Literal {
                class: AddressClass::Loopback,
                ..
            })
        ));
        assert!(matches!(
            check("[::1]").await,
            Err(EndpointRefused::Literal { .. })
        ));
        assert!(matches!(
            check("[::ffff:169.254.169.254]").await,
            Err(EndpointRefused::Literal {
                class: AddressClass::Metadata,
                ..
            })
        ));
        let err = check("nowhere.example").await.unwrap_err();
        assert!(matches!(err, EndpointRefused::Unresolvable { .. }));
        assert_eq!(err.rule(), "unresolvable");
        for (ip, rule) in [
            ("100.64.1.1", "cgnat"),
            ("169.254.169.254", "metadata"),
            ("fe80::1", "link-local"),
        ] {
            assert_eq!(check(ip).await.unwrap_err().rule(), rule, "{ip}");
        }
        let allowed = AddressPolicy::new(["evil.example", "127.0.0.1"], true);
        assert_eq!(
            check_host("evil.example", &allowed, &resolver).await,
            Ok(())
        );
        assert_eq!(check_host("127.0.0.1", &allowed, &resolver).await, Ok(()));
    }

    #[tokio::test]
    async fn send_time_resolver_keeps_only_allowed_addresses() {
        use tower_service::Service;
        let mut guarded = GuardedResolver {
            policy: Arc::new(AddressPolicy::default()),
            resolver: Arc::new(FixedResolver::new(&[
                ("mixed.example", "10.0.0.7"),
                ("mixed.example", "142.250.1.1"),
                ("rebound.example", "192.168.0.10"),
            ])),
        };
        let name = |s: &str| s.parse::<Name>().unwrap();
        let addrs: Vec<_> = guarded.call(name("mixed.example")).await.unwrap().collect();
        assert_eq!(addrs, vec!["142.250.1.1:0".parse().unwrap()]);
        let err = guarded.call(name("rebound.example")).await.unwrap_err();
        assert!(matches!(
            err,
            EndpointRefused::Resolved {
                class: AddressClass::Private,
                ..
            }
        ));
        guarded.policy = Arc::new(AddressPolicy::new(["rebound.example"], true));
        let addrs: Vec<_> = guarded
            .call(name("rebound.example"))
            .await
            .unwrap()
            .collect();
        assert_eq!(addrs.len(), 1);
    }
}
