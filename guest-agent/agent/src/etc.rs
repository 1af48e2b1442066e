//! The guest's identity files: hostname (SetHostname), `/etc/resolv.conf`
//! (SetDns) and `/etc/hosts` (SetHosts).
//!
//! Files are rewritten in place rather than replaced by a rename, so bind
//! mounts of them into containers keep showing the current content.
//! In host mode the files live under `--root` and the host's own hostname
//! is never touched.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::config::{Config, Mode};

pub const HOSTNAME_PATH: &str = "/etc/hostname";
pub const RESOLV_CONF_PATH: &str = "/etc/resolv.conf";
pub const HOSTS_PATH: &str = "/etc/hosts";

/// Linux HOST_NAME_MAX.
pub const MAX_HOSTNAME_LEN: usize = 64;
pub const MAX_NAMESERVERS: usize = 8;
pub const MAX_SEARCHES: usize = 32;
pub const MAX_OPTIONS: usize = 32;
pub const MAX_HOST_ENTRIES: usize = 1024;
pub const MAX_NAMES_PER_HOST: usize = 64;
/// Longest search domain, option or host alias.
pub const MAX_TOKEN_LEN: usize = 253;

#[derive(Debug, thiserror::Error)]
pub enum EtcError {
    #[error("hostname {hostname:?} is invalid: {reason}")]
    InvalidHostname { hostname: String, reason: String },
    #[error("{what} {value:?} is not an IP address")]
    NotAnIp { what: &'static str, value: String },
    #[error("{what} {value:?} is invalid: {reason}")]
    InvalidToken {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("{count} {what} given, the limit is {max}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("host entry for {ip} has no names")]
    NoNames { ip: String },
    #[error("Failed to set the hostname to {hostname:?}")]
    SetHostname {
        hostname: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// RFC 1123 host name: dot-separated labels of letters, digits and `-`,
/// no label starting or ending with `-`, at most 64 bytes in all.
pub fn validate_hostname(hostname: &str) -> Result<(), EtcError> {
    let fail = |reason: String| EtcError::InvalidHostname {
        hostname: hostname.escape_debug().to_string(),
        reason,
    };
    if hostname.is_empty() {
        return Err(fail("it is empty".into()));
    }
    if hostname.len() > MAX_HOSTNAME_LEN {
        return Err(fail(format!(
            "it is {} bytes long, the limit is {MAX_HOSTNAME_LEN}",
            hostname.len()
        )));
    }
    for label in hostname.split('.') {
        if label.is_empty() {
            return Err(fail("it has an empty label".into()));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !c.is_ascii_alphanumeric() && *c != '-')
        {
            return Err(fail(format!("character {c:?} is not allowed")));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(fail(format!("label {label:?} starts or ends with '-'")));
        }
    }
    Ok(())
}

/// Sets the hostname: the kernel's (guest mode only) and `/etc/hostname`.
pub fn set_hostname(config: &Config, hostname: &str) -> Result<(), EtcError> {
    validate_hostname(hostname)?;
    if config.mode == Mode::Guest {
        nix::unistd::sethostname(hostname).map_err(|errno| EtcError::SetHostname {
            hostname: hostname.to_string(),
            source: errno.into(),
        })?;
    }
    write_in_place(
        &config.resolve(Path::new(HOSTNAME_PATH)),
        &format!("{hostname}\n"),
    )
}

/// A validated SetDns request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    pub nameservers: Vec<IpAddr>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl Dns {
    pub fn validate(
        nameservers: &[String],
        searches: &[String],
        options: &[String],
    ) -> Result<Self, EtcError> {
        check_count("nameservers", nameservers.len(), MAX_NAMESERVERS)?;
        check_count("search domains", searches.len(), MAX_SEARCHES)?;
        check_count("resolver options", options.len(), MAX_OPTIONS)?;
        let nameservers = nameservers
            .iter()
            .map(|ns| parse_ip("nameserver", ns))
            .collect::<Result<_, _>>()?;
        for s in searches {
            check_token("search domain", s)?;
        }
        for o in options {
            check_token("resolver option", o)?;
        }
        Ok(Dns {
            nameservers,
            searches: searches.to_vec(),
            options: options.to_vec(),
        })
    }

    /// The resolv.conf text.
    pub fn render(&self) -> String {
        let mut out = String::from("# Written by boxlite-agent (SetDns).\n");
        for ns in &self.nameservers {
            out.push_str(&format!("nameserver {ns}\n"));
        }
        if !self.searches.is_empty() {
            out.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        if !self.options.is_empty() {
            out.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        out
    }
}

pub fn set_dns(config: &Config, dns: &Dns) -> Result<(), EtcError> {
    write_in_place(&config.resolve(Path::new(RESOLV_CONF_PATH)), &dns.render())
}

/// A validated SetHosts request: the whole of `/etc/hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hosts {
    pub entries: Vec<(IpAddr, Vec<String>)>,
}

impl Hosts {
    pub fn validate<'a>(
        entries: impl ExactSizeIterator<Item = (&'a str, &'a [String])>,
    ) -> Result<Self, EtcError> {
        check_count("host entries", entries.len(), MAX_HOST_ENTRIES)?;
        let mut out = Vec::with_capacity(entries.len());
        for (ip, names) in entries {
            let addr = parse_ip("host entry address", ip)?;
            if names.is_empty() {
                return Err(EtcError::NoNames { ip: ip.to_string() });
            }
            check_count("names for one host entry", names.len(), MAX_NAMES_PER_HOST)?;
            for n in names {
                check_token("host name", n)?;
            }
            out.push((addr, names.to_vec()));
        }
        Ok(Hosts { entries: out })
    }

    pub fn render(&self) -> String {
        let mut out = String::from("# Written by boxlite-agent (SetHosts).\n");
        for (ip, names) in &self.entries {
            out.push_str(&format!("{ip}\t{}\n", names.join(" ")));
        }
        out
    }
}

pub fn set_hosts(config: &Config, hosts: &Hosts) -> Result<(), EtcError> {
    write_in_place(&config.resolve(Path::new(HOSTS_PATH)), &hosts.render())
}

/// `/etc/hosts` written at boot, before the host sends its own.
pub fn default_hosts(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback {hostname}\n"
    )
}

fn check_count(what: &'static str, count: usize, max: usize) -> Result<(), EtcError> {
    if count > max {
        return Err(EtcError::TooMany { what, count, max });
    }
    Ok(())
}

fn parse_ip(what: &'static str, value: &str) -> Result<IpAddr, EtcError> {
    value.trim().parse().map_err(|_| EtcError::NotAnIp {
        what,
        value: value.escape_debug().to_string(),
    })
}

/// A word of a resolv.conf or hosts line: no blanks, control characters or
/// comment signs, which would change the file's meaning.
fn check_token(what: &'static str, value: &str) -> Result<(), EtcError> {
    let fail = |reason| EtcError::InvalidToken {
        what,
        value: value.escape_debug().to_string(),
        reason,
    };
    if value.is_empty() {
        return Err(fail("it is empty"));
    }
    if value.len() > MAX_TOKEN_LEN {
        return Err(fail("it is longer than 253 bytes"));
    }
    if value
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '#' || c == ';')
    {
        return Err(fail("it contains a blank, a control character, '#' or ';'"));
    }
    Ok(())
}

/// Replaces the content of `path` without replacing the inode; creates the
/// file and its parents when missing.
pub fn write_in_place(path: &Path, content: &str) -> Result<(), EtcError> {
    let wrap = |source| EtcError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(wrap)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(wrap)?;
    f.write_all(content.as_bytes()).map_err(wrap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostname_rules() {
        for ok in ["boxlite", "pod-1", "a.b.c", "X9", &"a".repeat(63)] {
            assert!(validate_hostname(ok).is_ok(), "{ok}");
        }
        let cases = [
            ("", "empty"),
            ("-a", "starts or ends"),
            ("a-", "starts or ends"),
            ("a..b", "empty label"),
            ("a_b", "'_'"),
            ("a b", "' '"),
            ("a\nb", "'\\n'"),
        ];
        for (bad, why) in cases {
            let e = validate_hostname(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let e = validate_hostname(&"a".repeat(65)).unwrap_err().to_string();
        assert!(e.contains("65 bytes long, the limit is 64"), "{e}");
    }

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn renders_resolv_conf() {
        let dns = Dns::validate(
            &strings(&["10.0.0.10", "fd00::a"]),
            &strings(&["ns.svc.cluster.local", "cluster.local"]),
            &strings(&["ndots:5"]),
        )
        .unwrap();
        assert_eq!(
            dns.render(),
            "# Written by boxlite-agent (SetDns).\nnameserver 10.0.0.10\nnameserver fd00::a\n\
             search ns.svc.cluster.local cluster.local\noptions ndots:5\n"
        );
    }

    #[test]
    fn rejects_bad_dns() {
        let e = Dns::validate(&strings(&["dns.google"]), &[], &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "nameserver \"dns.google\" is not an IP address"
        );
        let e = Dns::validate(&[], &strings(&["a\nnameserver 6.6.6.6"]), &[]).unwrap_err();
        assert!(e.to_string().starts_with("search domain"), "{e}");
        let many = strings(&["1.1.1.1"; MAX_NAMESERVERS + 1]);
        assert!(matches!(
            Dns::validate(&many, &[], &[]),
            Err(EtcError::TooMany { .. })
        ));
    }

    #[test]
    fn renders_and_checks_hosts() {
        let names = strings(&["web", "web.local"]);
        let hosts = Hosts::validate([("10.1.2.3", names.as_slice())].into_iter()).unwrap();
        assert_eq!(
            hosts.render(),
            "# Written by boxlite-agent (SetHosts).\n10.1.2.3\tweb web.local\n"
        );
        let none: Vec<String> = vec![];
        assert!(matches!(
            Hosts::validate([("10.1.2.3", none.as_slice())].into_iter()),
            Err(EtcError::NoNames { .. })
        ));
        let bad = strings(&["a#b"]);
        assert!(Hosts::validate([("::1", bad.as_slice())].into_iter()).is_err());
        assert!(Hosts::validate([("nope", names.as_slice())].into_iter()).is_err());
    }

    #[test]
    fn writes_in_place_keeping_the_inode() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc/hosts");
        write_in_place(&path, "one\n").unwrap();
        let ino = std::fs::metadata(&path).unwrap().ino();
        write_in_place(&path, "2\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "2\n");
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino);
    }
}
