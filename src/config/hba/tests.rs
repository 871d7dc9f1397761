//! Unit tests of the `hba_file` parser and matcher.

use super::*;

fn peer<'a>(addr: &str, user: &'a str, database: &'a str) -> Peer<'a> {
    Peer {
        addr: addr.parse().unwrap(),
        tls: false,
        user,
        database,
    }
}

fn method_for(rules: &HbaRules, addr: &str, user: &str, db: &str) -> Option<(Method, usize)> {
    rules
        .lookup(&peer(addr, user, db))
        .map(|v| (v.method, v.line))
}

fn parse(text: &str) -> HbaRules {
    HbaRules::parse(text).unwrap_or_else(|e| panic!("{text}: {e:?}"))
}

fn problem(text: &str) -> (usize, LineError) {
    let (line, _, e) = HbaRules::parse(text).expect_err(text);
    (line, e)
}

#[test]
fn first_matching_line_wins() {
    let rules = parse(
        "# comment\n\
         \n\
         host  app      app    127.0.0.1/32  scram-sha-256\n\
         host  all      all    127.0.0.0/8   md5   # trailing comment\n\
         host  all      all    0.0.0.0/0     reject\n",
    );
    assert_eq!(rules.len(), 3);
    assert_eq!(
        method_for(&rules, "127.0.0.1", "app", "app"),
        Some((Method::ScramSha256, 3))
    );
    assert_eq!(
        method_for(&rules, "127.0.0.2", "app", "app"),
        Some((Method::Md5, 4))
    );
    assert_eq!(
        method_for(&rules, "127.0.0.1", "other", "app"),
        Some((Method::Md5, 4))
    );
    assert_eq!(
        method_for(&rules, "10.1.2.3", "app", "app"),
        Some((Method::Reject, 5))
    );
    // No IPv6 line: an IPv6 client matches nothing.
    assert_eq!(method_for(&rules, "::1", "app", "app"), None);
}

#[test]
fn lists_keywords_and_quoted_names() {
    let rules = parse(
        "host db1,\"all\", db2 u1,u2 all trust\n\
         host sameuser all all password\n\
         host replication all all md5\n",
    );
    // "all" quoted is a database named all.
    assert_eq!(
        method_for(&rules, "10.0.0.1", "u1", "all"),
        Some((Method::Trust, 1))
    );
    assert_eq!(
        method_for(&rules, "10.0.0.1", "u2", "db2"),
        Some((Method::Trust, 1))
    );
    assert_eq!(
        method_for(&rules, "10.0.0.1", "u3", "u3"),
        Some((Method::Password, 2))
    );
    // replication lines never match a proxied connection.
    assert_eq!(method_for(&rules, "10.0.0.1", "u3", "db1"), None);
    let quoted = parse("host \"my db\" \"we\"\"ird\" all trust");
    assert_eq!(
        method_for(&quoted, "1.2.3.4", "we\"ird", "my db"),
        Some((Method::Trust, 1))
    );
}

#[test]
fn ipv6_netmask_column_and_mapped_clients() {
    let rules = parse(
        "host all all ::1/128 trust\n\
         host all all fd00::/8 md5\n\
         host all all 192.168.0.0 255.255.0.0 scram-sha-256\n\
         host all all ::0/0 reject\n",
    );
    assert_eq!(
        method_for(&rules, "::1", "u", "d"),
        Some((Method::Trust, 1))
    );
    assert_eq!(
        method_for(&rules, "fd12::7", "u", "d"),
        Some((Method::Md5, 2))
    );
    assert_eq!(
        method_for(&rules, "192.168.44.1", "u", "d"),
        Some((Method::ScramSha256, 3))
    );
    // An IPv4 client on a dual-stack socket matches IPv4 lines.
    assert_eq!(
        method_for(&rules, "::ffff:192.168.1.1", "u", "d"),
        Some((Method::ScramSha256, 3))
    );
    assert_eq!(
        method_for(&rules, "2001:db8::1", "u", "d"),
        Some((Method::Reject, 4))
    );
    assert_eq!(method_for(&rules, "10.0.0.1", "u", "d"), None);
}

#[test]
fn tls_decides_hostssl_and_hostnossl() {
    let rules = parse(
        "hostssl all all all cert\n\
         hostnossl all all all md5\n\
         local all all peer\n",
    );
    let mut p = peer("10.0.0.1", "u", "d");
    assert_eq!(rules.lookup(&p).map(|v| v.method), Some(Method::Md5));
    p.tls = true;
    assert_eq!(rules.lookup(&p).map(|v| v.method), Some(Method::Cert));
    let gss = parse("hostgssenc all all all trust\nhostnogssenc all all all md5");
    assert_eq!(
        method_for(&gss, "10.0.0.1", "u", "d"),
        Some((Method::Md5, 2))
    );
}

#[test]
fn continued_lines_keep_their_first_line_number() {
    let rules = parse("# x\nhost all \\\n  all 10.0.0.0/8 \\\n  trust\nhost all all all md5\n");
    assert_eq!(
        method_for(&rules, "10.9.9.9", "u", "d"),
        Some((Method::Trust, 2))
    );
    assert_eq!(
        method_for(&rules, "11.0.0.1", "u", "d"),
        Some((Method::Md5, 5))
    );
}

#[test]
fn unsupported_and_broken_lines_are_refused_with_their_line() {
    let ok = "host all all all trust\n";
    for (bad, expect) in [
        ("host all +admins all md5", "role membership"),
        ("host all @users.txt all md5", "file of names"),
        ("host all /^app all md5", "regular expression"),
        ("host samerole all all md5", "samerole"),
        ("host all all db.example.com md5", "host name"),
        ("host all all .example.com md5", "host name"),
        ("host all all samenet md5", "samenet"),
        ("host all all all ldap", "\"ldap\""),
        (
            "host all all all md5 clientcert=verify-full",
            "authentication option",
        ),
        ("host all all all cert", "only supported on hostssl"),
        ("host all all all mdfive", "invalid authentication method"),
        ("hots all all all md5", "invalid connection type"),
        ("include other.conf", "\"include\""),
        ("host all all 10.0.0.0/33 md5", "invalid IP mask"),
        ("host all all 10.0.0.0 md5", "needs a CIDR mask"),
        (
            "host all all 10.0.0.0 255.255.0.0",
            "end of line before the authentication",
        ),
        ("host all all 10.0.0.0 ffff:: md5", "invalid IP mask"),
        ("host all all 10.0.0.300/8 md5", "invalid IP address"),
        ("host \"all all 10.0.0.0/8 md5", "unterminated"),
        (
            "host db1,,db2 all all md5",
            "empty item in the database list",
        ),
        ("host all", "end of line before the user field"),
        (
            "host,local all all all md5",
            "a list in the connection type",
        ),
    ] {
        let text = format!("{ok}# comment\n{bad}\n");
        let (line, e) = problem(&text);
        assert_eq!(line, 3, "{bad}");
        assert!(e.to_string().contains(expect), "{bad}: {e}");
    }
}

#[test]
fn load_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hba.conf");
    std::fs::write(&path, "host all all all trust\nhost all +g all md5\n").unwrap();
    let e = HbaRules::load(&path).unwrap_err().to_string();
    assert!(e.contains("hba.conf, line 2"), "{e}");
    assert!(e.contains("host all +g all md5"), "{e}");
    let e = HbaRules::load(&dir.path().join("missing.conf")).unwrap_err();
    assert!(matches!(e, HbaError::Read { .. }), "{e}");
    // A file without rules is refused, as PostgreSQL refuses it.
    std::fs::write(&path, "# nothing\n\n").unwrap();
    let e = HbaRules::load(&path).unwrap_err();
    assert!(matches!(e, HbaError::Empty { .. }), "{e}");
    assert!(HbaRules::parse("# nothing\n").unwrap().is_empty());
}
