//! Finding a cluster's manager from its domain (DESIGN §4): a TXT record on the domain
//! holding `malai-cluster=<manager id52>`.
//!
//! `malai ssh cluster join <domain>` uses it when no manager id52 is given, and `malai ssh
//! cluster dns-record` prints the record to publish. The resolver is the system's
//! (`/etc/resolv.conf`) unless `MALAI_DNS_SERVER=ip:port` names one (tests run dnsmasq on
//! loopback that way). Exactly one distinct value must be present: a domain whose records
//! disagree could send a member to the wrong manager, so that is an error, not a choice.
//!
//! DNS is not trusted (docs/security.md): a forged answer would make the forger the
//! manager, who can push an ACL giving itself a shell. So the answer is also asked for with
//! DNSSEC validation (hickory's validating resolver, root trust anchors built in), and
//! [`Found::validation`] says what came of it; `cluster join` shows the id52 and the
//! validation state and asks a person to confirm, or takes `--manager <id52>` to pin it.
//! Only a `Secure` proof counts as validated; most resolvers (and every test resolver)
//! give `Insecure` or nothing, which is reported as "not validated", never hidden.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::dnssec::Proof;
use hickory_resolver::proto::rr::RData;

use crate::id52::Id52;

/// What the TXT value starts with.
pub const TXT_PREFIX: &str = "malai-cluster=";

/// Environment variable naming the DNS server to ask instead of the system's.
pub const DNS_SERVER_ENV: &str = "MALAI_DNS_SERVER";

/// A lookup that takes longer than this is reported as a failure.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DnsError {
    #[error("{DNS_SERVER_ENV}={0:?} is not an ip:port address")]
    BadServer(String),
    #[error("cannot set up the DNS resolver: {0}")]
    Setup(String),
    #[error("DNS lookup of TXT records for {domain} failed: {msg}")]
    Lookup { domain: String, msg: String },
    #[error(
        "{domain} has no TXT record \"{TXT_PREFIX}<manager id52>\"; publish one (see `malai ssh cluster dns-record` on the manager) or give the manager id52"
    )]
    NoRecord { domain: String },
    #[error("{domain} has several different \"{TXT_PREFIX}\" TXT records ({}); refusing to guess", .values.join(", "))]
    Several { domain: String, values: Vec<String> },
    #[error("{domain}: TXT record \"{TXT_PREFIX}{value}\" does not hold a valid id52: {msg}")]
    Malformed {
        domain: String,
        value: String,
        msg: String,
    },
}

/// The zone-file line to publish for cluster `alias` managed by `manager`.
pub fn record_for(alias: &str, manager: &Id52) -> String {
    let name = alias.trim_end_matches('.');
    format!("{name}. IN TXT \"{TXT_PREFIX}{manager}\"")
}

/// What DNSSEC said about the TXT answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Validation {
    /// A chain of signatures from the root trust anchor to the record: the answer is the
    /// domain owner's.
    Secure,
    /// The zone is provably unsigned, or the resolver could not get the DNSSEC records:
    /// the answer may be forged by anyone on the path.
    NotValidated(String),
    /// The zone is signed but the answer did not verify: forged or broken.
    Bogus,
}

impl std::fmt::Display for Validation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Validation::Secure => write!(f, "validated by DNSSEC"),
            Validation::NotValidated(why) => write!(f, "NOT validated by DNSSEC ({why})"),
            Validation::Bogus => write!(f, "DNSSEC validation FAILED (bogus signatures)"),
        }
    }
}

/// A manager found in DNS, with how far the answer can be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub manager: Id52,
    pub validation: Validation,
}

/// How long the DNSSEC check may take on top of the plain lookup.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(5);

/// The manager id52 from a domain's TXT record, and whether DNSSEC vouches for it.
pub async fn manager_of(domain: &str) -> Result<Found, DnsError> {
    let values = txt_values(domain, false).await?.0;
    let manager = manager_from_txt(domain, &values)?;
    let validation = match tokio::time::timeout(VALIDATE_TIMEOUT, txt_values(domain, true)).await {
        Err(_) => Validation::NotValidated("the validating lookup timed out".into()),
        Ok(Err(e)) => Validation::NotValidated(match e {
            DnsError::Lookup { msg, .. } => format!("the validating lookup failed: {msg}"),
            other => other.to_string(),
        }),
        Ok(Ok((values, proof))) => match manager_from_txt(domain, &values) {
            Ok(m) if m == manager => match proof {
                Some(Proof::Secure) => Validation::Secure,
                Some(Proof::Bogus) => Validation::Bogus,
                Some(Proof::Insecure) => Validation::NotValidated("unsigned zone".into()),
                _ => Validation::NotValidated("no DNSSEC data from the resolver".into()),
            },
            // The validating lookup saw something else: treat as forged.
            _ => Validation::Bogus,
        },
    };
    Ok(Found {
        manager,
        validation,
    })
}

/// The TXT values of `domain` and, when `validate`, the weakest DNSSEC proof among the
/// `malai-cluster=` records.
async fn txt_values(
    domain: &str,
    validate: bool,
) -> Result<(Vec<String>, Option<Proof>), DnsError> {
    let resolver = resolver(validate)?;
    // A trailing dot makes the name absolute: no search-domain guesses.
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let lookup = tokio::time::timeout(LOOKUP_TIMEOUT, resolver.txt_lookup(fqdn.as_str()))
        .await
        .map_err(|_| DnsError::Lookup {
            domain: domain.to_string(),
            msg: "timed out".into(),
        })?;
    let mut proof: Option<Proof> = None;
    let values: Vec<String> = match lookup {
        Ok(l) => l
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                // A TXT record is a list of strings that together form one value.
                RData::TXT(txt) => {
                    let v = txt
                        .txt_data
                        .iter()
                        .map(|s| String::from_utf8_lossy(s).into_owned())
                        .collect::<String>();
                    if v.trim().starts_with(TXT_PREFIX) {
                        let p = r.proof;
                        proof = Some(proof.map_or(p, |q| q.min(p)));
                    }
                    Some(v)
                }
                _ => None,
            })
            .collect(),
        Err(e) if e.is_no_records_found() || e.is_nx_domain() => vec![],
        Err(e) => {
            return Err(DnsError::Lookup {
                domain: domain.to_string(),
                msg: e.to_string(),
            });
        }
    };
    Ok((values, proof))
}

/// Pick the manager id52 out of a domain's TXT values (other TXT records are ignored).
pub fn manager_from_txt(domain: &str, values: &[String]) -> Result<Id52, DnsError> {
    let mut found: Vec<&str> = values
        .iter()
        .filter_map(|v| v.trim().strip_prefix(TXT_PREFIX))
        .map(str::trim)
        .collect();
    found.sort_unstable();
    found.dedup();
    match found.as_slice() {
        [] => Err(DnsError::NoRecord {
            domain: domain.to_string(),
        }),
        [one] => one.parse::<Id52>().map_err(|e| DnsError::Malformed {
            domain: domain.to_string(),
            value: one.chars().take(80).collect(),
            msg: e.to_string(),
        }),
        many => Err(DnsError::Several {
            domain: domain.to_string(),
            values: many.iter().map(|v| v.chars().take(60).collect()).collect(),
        }),
    }
}

fn resolver(validate: bool) -> Result<TokioResolver, DnsError> {
    let provider = TokioRuntimeProvider::default();
    let builder = match std::env::var(DNS_SERVER_ENV) {
        Ok(s) if !s.is_empty() => {
            let addr: SocketAddr = s.parse().map_err(|_| DnsError::BadServer(s.clone()))?;
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let ns = NameServerConfig::new(addr.ip(), true, vec![udp, tcp]);
            let mut b = TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(vec![ns]),
                provider,
            );
            *b.options_mut() = ResolverOpts::default();
            b
        }
        _ => TokioResolver::builder(provider).map_err(|e| DnsError::Setup(e.to_string()))?,
    };
    let mut builder = builder;
    builder.options_mut().validate = validate;
    builder.build().map_err(|e| DnsError::Setup(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn picks_the_one_value() {
        let id = Id52::from_bytes([9; 32]);
        let rec = format!("{TXT_PREFIX}{id}");
        assert_eq!(
            manager_from_txt("a.test", &vals(&["v=spf1 -all", &rec])),
            Ok(id)
        );
        // The same value twice is still one value.
        assert_eq!(manager_from_txt("a.test", &vals(&[&rec, &rec])), Ok(id));
    }

    #[test]
    fn errors() {
        let a = format!("{TXT_PREFIX}{}", Id52::from_bytes([1; 32]));
        let b = format!("{TXT_PREFIX}{}", Id52::from_bytes([2; 32]));
        assert!(matches!(
            manager_from_txt("a.test", &vals(&["v=spf1 -all"])),
            Err(DnsError::NoRecord { .. })
        ));
        assert!(matches!(
            manager_from_txt("a.test", &[]),
            Err(DnsError::NoRecord { .. })
        ));
        assert!(matches!(
            manager_from_txt("a.test", &vals(&[&a, &b])),
            Err(DnsError::Several { values, .. }) if values.len() == 2
        ));
        for bad in ["malai-cluster=", "malai-cluster=short", "malai-cluster=ZZ"] {
            assert!(matches!(
                manager_from_txt("a.test", &vals(&[bad])),
                Err(DnsError::Malformed { .. })
            ));
        }
    }

    #[test]
    fn record_line() {
        let id = Id52::from_bytes([0; 32]);
        assert_eq!(
            record_for("acme.test.", &id),
            format!("acme.test. IN TXT \"malai-cluster={id}\"")
        );
    }
}
