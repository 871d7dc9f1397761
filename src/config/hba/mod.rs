//! Client authentication rules in PostgreSQL's `pg_hba.conf` format
//! (`hba_file`): parsing, and the first-match lookup a login does.
//!
//! The subset that applies to a TCP proxy: connection types `host`,
//! `hostssl`, `hostnossl` (and `hostgssenc` / `hostnogssenc`, since no client
//! connection is GSS-encrypted); databases `all`, `sameuser`, `replication`
//! and names; users `all` and names; addresses `all`, CIDR (IPv4 and IPv6) or
//! an address followed by a netmask column; methods `trust`, `reject`, `md5`,
//! `scram-sha-256`, `password` and `cert`. Fields may be comma lists and
//! quoted (`"all"` quoted is a name, not the keyword), `#` starts a comment,
//! a trailing `\` continues a line. `local` lines are accepted and never match
//! (pgpilot listens on TCP only), so a copied `pg_hba.conf` loads.
//!
//! What is not supported is refused at load with the line at fault, never
//! silently ignored: a rule that loads must mean what PostgreSQL would make
//! of it. That covers `+role` and `@file`, regular expressions, host names,
//! `samehost` / `samenet`, `samerole`, `include` directives, authentication
//! options (`clientcert=`, `map=` …) and the methods that need an outside
//! service (`ldap`, `gss`, `ident` …).
//!
//! The rules are configuration: read and checked with the rest of it (so a
//! reload with a broken file keeps the old rules), held in
//! [`Config::hba`](super::Config::hba), and looked up by the session's
//! handshake through `auth::hba`, which re-exports this module.
//!
//! TLS: [`Peer::tls`] says whether the client connection is encrypted.
//! Nothing sets it yet, so `hostssl` lines never match and `hostnossl` lines
//! always do; a TLS listener only has to fill it in.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// How a matching line says the client authenticates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// Let the client in without a password.
    Trust,
    /// Refuse the client (28000).
    Reject,
    /// MD5 challenge; SCRAM when the user's password is stored as a SCRAM
    /// verifier (PostgreSQL's rule).
    Md5,
    /// SCRAM-SHA-256.
    ScramSha256,
    /// The password in clear text (only sensible over TLS).
    Password,
    /// A client certificate: pgpilot checks none, so such a login is refused.
    Cert,
}

/// The kind of connection a line applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnType {
    /// Unix-domain socket: pgpilot has none, never matches.
    Local,
    /// TCP, encrypted or not.
    Host,
    /// TCP with TLS.
    HostSsl,
    /// TCP without TLS.
    HostNoSsl,
    /// TCP with GSS encryption: never, pgpilot refuses GSSENCRequest.
    HostGssEnc,
    /// TCP without GSS encryption: every TCP connection.
    HostNoGssEnc,
}

/// One entry of a database list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Database {
    All,
    /// The database named like the user.
    SameUser,
    /// Physical replication connections, which pgpilot does not proxy.
    Replication,
    Name(String),
}

/// One entry of a user list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum User {
    All,
    Name(String),
}

/// The address column(s).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Address {
    /// Any address (`all`), and what `local` lines carry.
    All,
    /// An IPv4 network: address and mask.
    V4(u32, u32),
    /// An IPv6 network: address and mask.
    V6(u128, u128),
}

/// One rule: a non-empty, non-comment line of the file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    /// Line number in the file (the first, for continued lines).
    line: usize,
    conn: ConnType,
    databases: Vec<Database>,
    users: Vec<User>,
    address: Address,
    method: Method,
}

/// The parsed rules of an `hba_file`, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HbaRules {
    rules: Vec<Rule>,
}

/// A client asking to log in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Peer<'a> {
    /// The client's address as the socket reports it.
    pub addr: IpAddr,
    /// Whether the client connection is TLS-encrypted.
    pub tls: bool,
    /// Role name from the startup packet.
    pub user: &'a str,
    /// Database from the startup packet.
    pub database: &'a str,
}

/// The line a client matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// How the client authenticates.
    pub method: Method,
    /// The line's number in the file, for logs.
    pub line: usize,
}

/// Why an `hba_file` could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum HbaError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// No rule at all. PostgreSQL refuses such a file too: it would refuse
    /// every client, and is more likely a file caught half-written.
    #[error("{path} contains no rules")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A line is wrong or asks for something pgpilot does not support.
    #[error("{path}, line {line}: {problem}: {content}")]
    Line {
        /// The file.
        path: PathBuf,
        /// Its line number (1-based).
        line: usize,
        /// The line as written.
        content: String,
        /// What is wrong with it.
        problem: LineError,
    },
}

/// What is wrong with one line of an `hba_file`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LineError {
    /// A `"` without its closing `"`.
    #[error("unterminated quoted string")]
    UnterminatedQuote,
    /// The line ends before a required field.
    #[error("end of line before the {0} field")]
    Missing(&'static str),
    /// A comma list with an empty item.
    #[error("empty item in the {0} list")]
    EmptyItem(&'static str),
    /// Not a connection type PostgreSQL knows.
    #[error("invalid connection type {0:?}")]
    ConnType(String),
    /// Not an IP address (host names are refused separately).
    #[error("invalid IP address {0:?}")]
    Address(String),
    /// A CIDR length or netmask that does not fit the address.
    #[error("invalid IP mask {0:?}")]
    Mask(String),
    /// An address without `/len` and without a netmask column.
    #[error("IP address {0:?} needs a CIDR mask (/len) or a netmask column")]
    NoMask(String),
    /// Not an authentication method PostgreSQL knows.
    #[error("invalid authentication method {0:?}")]
    Method(String),
    /// PostgreSQL refuses `cert` outside `hostssl` lines, and so does pgpilot.
    #[error("cert authentication is only supported on hostssl connections")]
    CertWithoutSsl,
    /// Valid for PostgreSQL, not supported by pgpilot.
    #[error("{0} is not supported by pgpilot")]
    Unsupported(String),
}

/// One field: its comma-separated items, each with whether it was quoted.
type Field = Vec<(String, bool)>;

impl HbaRules {
    /// Read and parse `path`.
    pub(crate) fn load(path: &Path) -> Result<HbaRules, HbaError> {
        let text = std::fs::read_to_string(path).map_err(|source| HbaError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let rules = HbaRules::parse(&text).map_err(|(line, content, problem)| HbaError::Line {
            path: path.to_path_buf(),
            line,
            content,
            problem,
        })?;
        if rules.is_empty() {
            return Err(HbaError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(rules)
    }

    /// Parse the text of a file; an error gives the line number and text.
    pub(crate) fn parse(text: &str) -> Result<HbaRules, (usize, String, LineError)> {
        let mut rules = Vec::new();
        let mut pending = String::new();
        let mut first_line = 0;
        for (i, raw) in text.lines().enumerate() {
            if pending.is_empty() {
                first_line = i + 1;
            }
            // A backslash at the end continues the line (PostgreSQL 16+);
            // one inside a comment does not.
            let body = raw.trim_end();
            if let Some(cont) = body.strip_suffix('\\')
                && !strip_comment(cont).1
            {
                pending.push_str(cont);
                pending.push(' ');
                continue;
            }
            pending.push_str(raw);
            let line = std::mem::take(&mut pending);
            let fields = tokenize(&line).map_err(|e| (first_line, line.clone(), e))?;
            if fields.is_empty() {
                continue;
            }
            let rule =
                Rule::from_fields(first_line, fields).map_err(|e| (first_line, line.clone(), e))?;
            rules.push(rule);
        }
        if !pending.is_empty() {
            let fields = tokenize(&pending).map_err(|e| (first_line, pending.clone(), e))?;
            if !fields.is_empty() {
                let rule = Rule::from_fields(first_line, fields)
                    .map_err(|e| (first_line, pending.clone(), e))?;
                rules.push(rule);
            }
        }
        Ok(HbaRules { rules })
    }

    /// Number of rules (lines that are not empty or comments).
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether the text holds no rule ([`HbaRules::load`] refuses that).
    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first line `peer` matches, as PostgreSQL looks it up; `None`
    /// means no line matches and the client is refused.
    pub(crate) fn lookup(&self, peer: &Peer<'_>) -> Option<Verdict> {
        // An IPv4 client of a dual-stack socket shows as ::ffff:a.b.c.d;
        // PostgreSQL matches it against IPv4 lines too.
        let addr = peer.addr.to_canonical();
        self.rules
            .iter()
            .find(|r| r.matches(peer, addr))
            .map(|r| Verdict {
                method: r.method,
                line: r.line,
            })
    }
}

impl Rule {
    fn matches(&self, peer: &Peer<'_>, addr: IpAddr) -> bool {
        let conn = match self.conn {
            ConnType::Local | ConnType::HostGssEnc => false,
            ConnType::Host | ConnType::HostNoGssEnc => true,
            ConnType::HostSsl => peer.tls,
            ConnType::HostNoSsl => !peer.tls,
        };
        conn && self.address.contains(addr)
            && self.databases.iter().any(|d| match d {
                Database::All => true,
                Database::SameUser => peer.database == peer.user,
                Database::Replication => false,
                Database::Name(n) => n == peer.database,
            })
            && self.users.iter().any(|u| match u {
                User::All => true,
                User::Name(n) => n == peer.user,
            })
    }

    fn from_fields(line: usize, fields: Vec<Field>) -> Result<Rule, LineError> {
        let mut fields = fields.into_iter();
        let mut next = |what: &'static str| fields.next().ok_or(LineError::Missing(what));
        let conn_field = next("connection type")?;
        let conn_word = single(&conn_field, "connection type")?;
        let conn = match conn_word {
            "local" => ConnType::Local,
            "host" => ConnType::Host,
            "hostssl" => ConnType::HostSsl,
            "hostnossl" => ConnType::HostNoSsl,
            "hostgssenc" => ConnType::HostGssEnc,
            "hostnogssenc" => ConnType::HostNoGssEnc,
            "include" | "include_if_exists" | "include_dir" => {
                return Err(LineError::Unsupported(format!("{conn_word:?}")));
            }
            other => return Err(LineError::ConnType(other.to_string())),
        };
        let databases = next("database")?
            .into_iter()
            .map(|(t, quoted)| database(t, quoted))
            .collect::<Result<Vec<_>, _>>()?;
        let users = next("user")?
            .into_iter()
            .map(|(t, quoted)| user(t, quoted))
            .collect::<Result<Vec<_>, _>>()?;
        let address = if conn == ConnType::Local {
            Address::All
        } else {
            let addr_field = next("IP address")?;
            let text = single(&addr_field, "IP address")?.to_string();
            if let Some(a) = address_alone(&text)? {
                a
            } else {
                let mask_field = next("netmask").map_err(|_| LineError::NoMask(text.clone()))?;
                address_with_mask(&text, single(&mask_field, "netmask")?)?
            }
        };
        let method_field = next("authentication method")?;
        let method = method(single(&method_field, "authentication method")?, conn)?;
        if let Some(options) = fields.next() {
            let first = options.first().map(|o| o.0.as_str()).unwrap_or_default();
            return Err(LineError::Unsupported(format!(
                "authentication option {first:?}"
            )));
        }
        if method == Method::Cert && conn != ConnType::HostSsl {
            return Err(LineError::CertWithoutSsl);
        }
        Ok(Rule {
            line,
            conn,
            databases,
            users,
            address,
            method,
        })
    }
}

impl Address {
    fn contains(&self, addr: IpAddr) -> bool {
        match (self, addr) {
            (Address::All, _) => true,
            (Address::V4(net, mask), IpAddr::V4(a)) => u32::from(a) & mask == net & mask,
            (Address::V6(net, mask), IpAddr::V6(a)) => u128::from(a) & mask == net & mask,
            _ => false,
        }
    }
}

/// The one item of a field that is not a list.
fn single<'f>(field: &'f Field, what: &'static str) -> Result<&'f str, LineError> {
    match field.as_slice() {
        [(t, _)] => Ok(t),
        _ => Err(LineError::Unsupported(format!(
            "a list in the {what} field"
        ))),
    }
}

/// Refuse the user/database forms pgpilot does not support.
fn unsupported_name(t: &str, quoted: bool) -> Result<(), LineError> {
    if quoted {
        return Ok(());
    }
    match t.chars().next() {
        Some('+') => Err(LineError::Unsupported(format!(
            "role membership ({t:?}, `+role`)"
        ))),
        Some('@') => Err(LineError::Unsupported(format!(
            "a file of names ({t:?}, `@file`)"
        ))),
        Some('/') => Err(LineError::Unsupported(format!(
            "a regular expression ({t:?})"
        ))),
        _ => Ok(()),
    }
}

fn database(t: String, quoted: bool) -> Result<Database, LineError> {
    unsupported_name(&t, quoted)?;
    Ok(match (t.as_str(), quoted) {
        ("all", false) => Database::All,
        ("sameuser", false) => Database::SameUser,
        ("replication", false) => Database::Replication,
        ("samerole" | "samegroup", false) => {
            return Err(LineError::Unsupported(format!("{t:?} (role membership)")));
        }
        _ => Database::Name(t),
    })
}

fn user(t: String, quoted: bool) -> Result<User, LineError> {
    unsupported_name(&t, quoted)?;
    Ok(match (t.as_str(), quoted) {
        ("all", false) => User::All,
        _ => User::Name(t),
    })
}

/// `all`, or an address with a `/len` mask; `None` for an address that
/// takes its mask from the next column.
fn address_alone(text: &str) -> Result<Option<Address>, LineError> {
    match text {
        "all" => return Ok(Some(Address::All)),
        "samehost" | "samenet" => {
            return Err(LineError::Unsupported(format!("{text:?} addresses")));
        }
        _ => {}
    }
    let (ip, len) = match text.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (text, None),
    };
    let ip: IpAddr = ip.parse().map_err(|_| {
        // IPv6 addresses hold letters too; a name has no colon.
        let named = !ip.contains(':') && ip.chars().any(|c| c.is_ascii_alphabetic());
        if named || ip.starts_with('.') {
            LineError::Unsupported(format!("host name {text:?} (give an IP address)"))
        } else {
            LineError::Address(text.to_string())
        }
    })?;
    let Some(len) = len else {
        return Ok(None);
    };
    let bad_mask = || LineError::Mask(text.to_string());
    let len: u32 = len.parse().map_err(|_| bad_mask())?;
    Ok(Some(match ip {
        IpAddr::V4(a) if len <= 32 => {
            Address::V4(a.into(), u32::MAX.checked_shl(32 - len).unwrap_or(0))
        }
        IpAddr::V6(a) if len <= 128 => {
            Address::V6(a.into(), u128::MAX.checked_shl(128 - len).unwrap_or(0))
        }
        _ => return Err(bad_mask()),
    }))
}

/// An address and its netmask column (`192.168.0.0 255.255.0.0`).
fn address_with_mask(text: &str, mask: &str) -> Result<Address, LineError> {
    let ip: IpAddr = text
        .parse()
        .map_err(|_| LineError::Address(text.to_string()))?;
    // A column that is no address at all is the method: the mask is missing.
    let m: IpAddr = mask
        .parse()
        .map_err(|_| LineError::NoMask(text.to_string()))?;
    match (ip, m) {
        (IpAddr::V4(a), IpAddr::V4(m)) => Ok(Address::V4(a.into(), m.into())),
        (IpAddr::V6(a), IpAddr::V6(m)) => Ok(Address::V6(a.into(), m.into())),
        _ => Err(LineError::Mask(mask.to_string())),
    }
}

fn method(word: &str, conn: ConnType) -> Result<Method, LineError> {
    Ok(match word {
        "trust" => Method::Trust,
        "reject" => Method::Reject,
        "md5" => Method::Md5,
        "scram-sha-256" => Method::ScramSha256,
        "password" => Method::Password,
        "cert" => Method::Cert,
        // Methods that need the operating system or an outside service. On a
        // `local` line they cost nothing (it never matches), so a copied
        // pg_hba.conf with `local all all peer` loads.
        "peer" | "ident" | "gss" | "sspi" | "pam" | "ldap" | "radius" | "bsd" | "krb5" => {
            if conn == ConnType::Local {
                Method::Reject
            } else {
                return Err(LineError::Unsupported(format!(
                    "authentication method {word:?}"
                )));
            }
        }
        other => return Err(LineError::Method(other.to_string())),
    })
}

/// Text before an unquoted `#`, and whether a `#` cut it.
fn strip_comment(line: &str) -> (&str, bool) {
    let mut quoted = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => quoted = !quoted,
            '#' if !quoted => return (&line[..i], true),
            _ => {}
        }
    }
    (line, false)
}

/// Split a line into fields of comma-separated items, as PostgreSQL's
/// tokenizer does: whitespace separates fields, a comma continues the field
/// (whitespace after it is skipped), `"…"` quotes (`""` is a quote inside).
fn tokenize(line: &str) -> Result<Vec<Field>, LineError> {
    let (line, _) = strip_comment(line);
    let mut fields: Vec<Field> = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(fields);
        }
        let mut field: Field = Vec::new();
        loop {
            let mut item = String::new();
            let mut quoted = false;
            let mut in_quotes = false;
            while let Some(&c) = chars.peek() {
                if in_quotes {
                    chars.next();
                    if c == '"' {
                        if chars.next_if_eq(&'"').is_some() {
                            item.push('"');
                        } else {
                            in_quotes = false;
                        }
                    } else {
                        item.push(c);
                    }
                } else if c == '"' {
                    chars.next();
                    in_quotes = true;
                    quoted = true;
                } else if c.is_whitespace() || c == ',' {
                    break;
                } else {
                    chars.next();
                    item.push(c);
                }
            }
            if in_quotes {
                return Err(LineError::UnterminatedQuote);
            }
            let comma = chars.next_if_eq(&',').is_some();
            if item.is_empty() && !quoted && (comma || !field.is_empty()) {
                return Err(LineError::EmptyItem(field_name(fields.len())));
            }
            field.push((item, quoted));
            if !comma {
                break;
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
        }
        fields.push(field);
    }
}

fn field_name(i: usize) -> &'static str {
    ["connection type", "database", "user", "address"]
        .get(i)
        .copied()
        .unwrap_or("option")
}

#[cfg(test)]
mod tests;
