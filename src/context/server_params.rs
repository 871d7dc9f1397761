//! The server-wide ParameterStatus values of the last primary connection,
//! kept for admin logins while no primary can be reached
//! (`session/no_primary_login.rs`): such a login reports them, overridden by what the
//! client's startup packet asked for.

use std::sync::Mutex;

use crate::protocol::startup::StartupMessage;

/// Server-wide ParameterStatus values, as the last primary connection reported
/// them. Session-specific ones (`application_name`, `is_superuser`,
/// `session_authorization`) are not kept.
#[derive(Default)]
pub(crate) struct ServerParams(Mutex<Vec<(String, String)>>);

/// Reported per session, never taken from another session's connection.
const PER_SESSION: [&str; 3] = ["application_name", "is_superuser", "session_authorization"];

/// Startup parameters PostgreSQL reports back as ParameterStatus.
const ECHOED: [&str; 5] = [
    "application_name",
    "client_encoding",
    "DateStyle",
    "IntervalStyle",
    "TimeZone",
];

impl ServerParams {
    /// Keep `params` (a fresh primary connection's), if they differ.
    pub(crate) fn remember(&self, params: &[(String, String)]) {
        let mut kept = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let wanted = params
            .iter()
            .filter(|(k, _)| !PER_SESSION.contains(&k.as_str()));
        if !kept.iter().eq(wanted.clone()) {
            *kept = wanted.cloned().collect();
        }
    }

    /// What a login without a server reports: the kept values (or, before any
    /// primary connection, PostgreSQL's defaults), the client's own startup
    /// settings, and the session's user.
    pub(crate) fn for_login(&self, startup: &StartupMessage, user: &str) -> Vec<(String, String)> {
        let mut params = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if params.is_empty() {
            params = [
                ("client_encoding", "UTF8"),
                ("DateStyle", "ISO, MDY"),
                ("integer_datetimes", "on"),
                ("IntervalStyle", "postgres"),
                ("server_encoding", "UTF8"),
                ("standard_conforming_strings", "on"),
                ("TimeZone", "UTC"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        }
        let mut set = |key: &str, value: &str| match params.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = value.to_string(),
            None => params.push((key.to_string(), value.to_string())),
        };
        for key in ECHOED {
            if let Some(v) = startup.get(key) {
                set(key, v);
            }
        }
        if startup.get("application_name").is_none() {
            set("application_name", "");
        }
        set("session_authorization", user);
        set("is_superuser", "off");
        params
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> StartupMessage {
        StartupMessage {
            minor: 0,
            params: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            protocol_options: Vec::new(),
        }
    }

    fn get<'a>(p: &'a [(String, String)], key: &str) -> Option<&'a str> {
        p.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_login_without_a_primary_reports_the_last_primary_values_and_its_own_settings() {
        let kept = ServerParams::default();
        let before = kept.for_login(&startup(&[("user", "ops")]), "ops");
        assert_eq!(get(&before, "server_encoding"), Some("UTF8"));
        assert_eq!(get(&before, "server_version"), None);
        let server: Vec<(String, String)> = [
            ("server_version", "15.8"),
            ("TimeZone", "Europe/Paris"),
            ("application_name", "someone-else"),
            ("is_superuser", "on"),
            ("session_authorization", "postgres"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        kept.remember(&server);
        let p = kept.for_login(
            &startup(&[
                ("user", "ops"),
                ("TimeZone", "UTC"),
                ("application_name", "psql"),
            ]),
            "ops",
        );
        assert_eq!(get(&p, "server_version"), Some("15.8"));
        assert_eq!(get(&p, "TimeZone"), Some("UTC"));
        assert_eq!(get(&p, "application_name"), Some("psql"));
        assert_eq!(get(&p, "session_authorization"), Some("ops"));
        assert_eq!(get(&p, "is_superuser"), Some("off"));
        let p = kept.for_login(&startup(&[("user", "ops")]), "ops");
        assert_eq!(get(&p, "TimeZone"), Some("Europe/Paris"));
        assert_eq!(get(&p, "application_name"), Some(""));
        assert_eq!(p.iter().filter(|(k, _)| k == "is_superuser").count(), 1);
    }
}
