//! Server-side password checks for clients: SCRAM-SHA-256 (RFC 5802/7677 as
//! PostgreSQL uses it), SCRAM-SHA-256-PLUS with `tls-server-end-point`
//! channel binding (RFC 5929) for TLS clients, and MD5.
//!
//! The client side (pgpilot logging in to a PostgreSQL node) lives in
//! `backend::conn` and uses `postgres-protocol` when pgpilot has the user's
//! password. For a user configured with only a SCRAM verifier, a client's
//! SCRAM login to pgpilot yields the keys ([`ScramKeys`]) that log in to a node
//! storing the same verifier, and [`ScramKeyClient`] does that exchange.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, KeyInit, Mac};
use postgres_protocol::authentication::md5_hash;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::frame::cstr;

type HmacSha256 = Hmac<Sha256>;

/// Why a client could not be authenticated. Every variant is reported to the
/// client as the same 28P01 message so that user names cannot be probed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum AuthError {
    /// Wrong password, unknown user, or a proof that does not verify.
    #[error("password authentication failed")]
    Failed,
    /// The client sent something that is not a valid SASL/password message.
    #[error("malformed authentication message: {0}")]
    Malformed(&'static str),
    /// A node announced another salt or iteration count than the verifier the
    /// keys came from: it stores another verifier for the user.
    #[error(
        "the server's SCRAM verifier for this user differs from the configured scram_verifier (salt or iteration count); copy it from pg_authid.rolpassword"
    )]
    VerifierMismatch,
}

/// A parsed SCRAM-SHA-256 verifier (`SCRAM-SHA-256$iter:salt$StoredKey:ServerKey`).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ScramVerifier {
    /// PBKDF2 iteration count announced to the client.
    pub(crate) iterations: u32,
    /// Salt announced to the client.
    pub(crate) salt: Vec<u8>,
    /// H(ClientKey): checks the client's proof.
    pub(crate) stored_key: [u8; 32],
    /// Signs the server-final message so the client knows we hold the verifier.
    pub(crate) server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "ScramVerifier(iterations={})", self.iterations)
    }
}

impl ScramVerifier {
    /// Parse PostgreSQL's verifier format, as stored in `pg_authid.rolpassword`.
    pub(crate) fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (params, keys) = rest.split_once('$')?;
        let (iter, salt) = params.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let iterations: u32 = iter.parse().ok().filter(|i| *i > 0)?;
        let salt = B64.decode(salt).ok()?;
        let stored_key: [u8; 32] = B64.decode(stored).ok()?.try_into().ok()?;
        let server_key: [u8; 32] = B64.decode(server).ok()?.try_into().ok()?;
        Some(ScramVerifier {
            iterations,
            salt,
            stored_key,
            server_key,
        })
    }

    /// Derive a verifier from a plain password (random salt, 4096 iterations).
    #[cfg(test)]
    pub(crate) fn from_password(password: &str) -> ScramVerifier {
        let v = postgres_protocol::password::scram_sha_256(password.as_bytes());
        ScramVerifier::parse(&v).expect("postgres-protocol produces valid verifiers")
    }

    /// A verifier no password matches, with a salt that is stable per user name, so
    /// that an unknown user goes through the same exchange as a known one.
    pub(crate) fn mock(user: &str, server_secret: &[u8]) -> ScramVerifier {
        let salt = hmac(server_secret, user.as_bytes())[..16].to_vec();
        ScramVerifier {
            iterations: 4096,
            salt,
            stored_key: hmac(server_secret, b"stored"),
            server_key: hmac(server_secret, b"server"),
        }
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    let mut out = [0u8; 32];
    out.copy_from_slice(&mac.finalize().into_bytes());
    out
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(&Sha256::digest(data));
    out
}

/// Equality in time independent of the contents (only a length mismatch
/// returns early), so a proof cannot be guessed byte by byte.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// What a client's SCRAM-SHA-256 login proved: its ClientKey, with the
/// verifier it matched. A server that stores the same verifier for the user
/// accepts a login with these keys (SCRAM pass-through), no password needed.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct ScramKeys {
    /// The client's ClientKey (H(ClientKey) is the verifier's StoredKey).
    pub(crate) client_key: [u8; 32],
    /// The verifier the login matched: its salt and iteration count must be
    /// what the server announces, its ServerKey checks the server.
    pub(crate) verifier: ScramVerifier,
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "ScramKeys({:?})", self.verifier)
    }
}

/// Client state of one SCRAM-SHA-256 login with [`ScramKeys`] instead of a
/// password.
pub(crate) struct ScramKeyClient {
    /// The keys that make the proof.
    keys: ScramKeys,
    /// Our nonce; the server's extends it.
    nonce: String,
    /// `client-first-message-bare`, part of the signed AuthMessage.
    client_first_bare: String,
    /// The AuthMessage, once the server-first message is seen.
    auth_message: String,
}

impl ScramKeyClient {
    /// Start a login; also returns the client-first message (for
    /// SASLInitialResponse).
    pub(crate) fn new(keys: ScramKeys) -> (ScramKeyClient, Vec<u8>) {
        let mut raw = [0u8; 18];
        rand::fill(&mut raw);
        let nonce = B64.encode(raw);
        // PostgreSQL takes the user from the startup packet, not from `n=`.
        let client_first_bare = format!("n=,r={nonce}");
        let first = format!("n,,{client_first_bare}").into_bytes();
        let client = ScramKeyClient {
            keys,
            nonce,
            client_first_bare,
            auth_message: String::new(),
        };
        (client, first)
    }

    /// Handle the server-first message; returns the client-final message.
    pub(crate) fn server_first(&mut self, data: &[u8]) -> Result<Vec<u8>, AuthError> {
        let msg = std::str::from_utf8(data).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let (mut nonce, mut salt, mut iterations) = (None, None, None);
        for attr in msg.split(',') {
            if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            } else if let Some(v) = attr.strip_prefix("s=") {
                salt = B64.decode(v).ok();
            } else if let Some(v) = attr.strip_prefix("i=") {
                iterations = v.parse::<u32>().ok();
            }
        }
        let nonce = nonce
            .filter(|n| n.len() > self.nonce.len() && n.starts_with(&self.nonce))
            .ok_or(AuthError::Malformed("server nonce does not extend ours"))?;
        let (salt, iterations) = salt
            .zip(iterations)
            .ok_or(AuthError::Malformed("no salt or iteration count"))?;
        let v = &self.keys.verifier;
        if salt != v.salt || iterations != v.iterations {
            return Err(AuthError::VerifierMismatch);
        }
        // "biws" is base64("n,,"): no channel binding.
        let without_proof = format!("c=biws,r={nonce}");
        self.auth_message = format!("{},{msg},{without_proof}", self.client_first_bare);
        let signature = hmac(&v.stored_key, self.auth_message.as_bytes());
        let mut proof = self.keys.client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Check the server-final message: the server holds the verifier.
    pub(crate) fn server_final(&self, data: &[u8]) -> Result<(), AuthError> {
        let msg = std::str::from_utf8(data).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let signature = msg
            .split(',')
            .find_map(|a| a.strip_prefix("v="))
            .and_then(|v| B64.decode(v).ok())
            .ok_or(AuthError::Malformed("no server signature"))?;
        let expected = hmac(&self.keys.verifier.server_key, self.auth_message.as_bytes());
        if self.auth_message.is_empty() || !ct_eq(&signature, &expected) {
            return Err(AuthError::Failed);
        }
        Ok(())
    }
}

/// Server state of one SCRAM-SHA-256 exchange.
pub(crate) struct ScramServer {
    /// The verifier the proof is checked against.
    verifier: ScramVerifier,
    /// The client's key, once its proof verified.
    client_key: Option<[u8; 32]>,
    /// Combined client+server nonce, once the first message is seen.
    nonce: String,
    /// `client-first-message-bare`, part of the signed AuthMessage.
    client_first_bare: String,
    /// Our `server-first-message`, part of the signed AuthMessage.
    server_first: String,
    /// GS2 header the client sent; echoed base64-encoded in `c=`.
    gs2_header: String,
    /// `tls-server-end-point` data when SCRAM-SHA-256-PLUS was offered (a
    /// TLS client): the client must bind to it, or say it could not (`y`)
    /// only at the price of a refusal.
    channel_binding: Option<Vec<u8>>,
    /// The client chose channel binding (`p=tls-server-end-point`).
    bound: bool,
}

impl ScramServer {
    /// Start an exchange against `verifier`.
    pub(crate) fn new(verifier: ScramVerifier) -> ScramServer {
        ScramServer {
            verifier,
            client_key: None,
            nonce: String::new(),
            client_first_bare: String::new(),
            server_first: String::new(),
            gs2_header: String::new(),
            channel_binding: None,
            bound: false,
        }
    }

    /// Start an exchange that offered SCRAM-SHA-256-PLUS, bound to the
    /// server certificate's `tls-server-end-point` data.
    pub(crate) fn with_channel_binding(verifier: ScramVerifier, end_point: Vec<u8>) -> ScramServer {
        ScramServer {
            channel_binding: Some(end_point),
            ..ScramServer::new(verifier)
        }
    }

    /// Handle the SASLInitialResponse body; returns the server-first-message.
    pub(crate) fn client_first(&mut self, body: &[u8]) -> Result<Vec<u8>, AuthError> {
        let (mechanism, rest) = cstr(body).ok_or(AuthError::Malformed("no mechanism"))?;
        let plus = match mechanism {
            b"SCRAM-SHA-256" => false,
            b"SCRAM-SHA-256-PLUS" if self.channel_binding.is_some() => true,
            _ => return Err(AuthError::Malformed("unsupported SASL mechanism")),
        };
        if rest.len() < 4 {
            return Err(AuthError::Malformed("missing SASL data length"));
        }
        let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let data = &rest[4..];
        if len < 0 || len as usize != data.len() {
            return Err(AuthError::Malformed("bad SASL data length"));
        }
        let msg = std::str::from_utf8(data).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        // gs2-header: "n,," (no binding), "y,," (the client could bind but
        // thinks the server cannot), "p=tls-server-end-point,," (bound).
        let (cbind, rest) = msg
            .split_once(',')
            .ok_or(AuthError::Malformed("no gs2 header"))?;
        match (cbind, plus) {
            ("n", false) => {}
            // PostgreSQL's downgrade protection: PLUS was offered, so a
            // client saying the server cannot bind was tampered with.
            ("y", false) if self.channel_binding.is_some() => {
                return Err(AuthError::Malformed(
                    "SCRAM channel binding negotiation error: the client supports channel binding but thinks the server does not, although it does",
                ));
            }
            ("y", false) => {}
            ("p=tls-server-end-point", true) => self.bound = true,
            (_, true) => {
                return Err(AuthError::Malformed(
                    "SCRAM-SHA-256-PLUS needs channel binding type tls-server-end-point",
                ));
            }
            (_, false) => {
                return Err(AuthError::Malformed(
                    "the client selected SCRAM-SHA-256 without channel binding, but the message includes channel binding data",
                ));
            }
        }
        let (_authzid, bare) = rest
            .split_once(',')
            .ok_or(AuthError::Malformed("no gs2 header"))?;
        self.gs2_header = msg[..msg.len() - bare.len()].to_string();
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(AuthError::Malformed("no client nonce"))?;
        let mut server_nonce = [0u8; 18];
        rand::fill(&mut server_nonce);
        self.nonce = format!("{client_nonce}{}", B64.encode(server_nonce));
        self.client_first_bare = bare.to_string();
        self.server_first = format!(
            "r={},s={},i={}",
            self.nonce,
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        Ok(self.server_first.clone().into_bytes())
    }

    /// Handle the SASLResponse body; returns the server-final-message when the proof verifies.
    pub(crate) fn client_final(&mut self, body: &[u8]) -> Result<Vec<u8>, AuthError> {
        let msg = std::str::from_utf8(body).map_err(|_| AuthError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(AuthError::Malformed("no proof"))?;
        let mut binding = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(v) = attr.strip_prefix("c=") {
                binding = Some(v);
            } else if let Some(v) = attr.strip_prefix("r=") {
                nonce = Some(v);
            }
        }
        // c= is base64(gs2-header + the channel binding data, when bound).
        let mut expected = self.gs2_header.as_bytes().to_vec();
        if self.bound {
            expected.extend_from_slice(self.channel_binding.as_deref().unwrap_or_default());
        }
        if binding.map(|b| B64.decode(b)).and_then(Result::ok) != Some(expected) {
            return Err(AuthError::Malformed("channel binding mismatch"));
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(AuthError::Malformed("nonce mismatch"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| AuthError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(AuthError::Failed);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let client_signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = [0u8; 32];
        for i in 0..32 {
            client_key[i] = proof[i] ^ client_signature[i];
        }
        if !ct_eq(&sha256(&client_key), &self.verifier.stored_key) {
            return Err(AuthError::Failed);
        }
        self.client_key = Some(client_key);
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }

    /// What the client proved, once [`ScramServer::client_final`] succeeded.
    pub(crate) fn proven_keys(&self) -> Option<ScramKeys> {
        self.client_key.map(|client_key| ScramKeys {
            client_key,
            verifier: self.verifier.clone(),
        })
    }
}

/// Check a clear-text password against a SCRAM verifier, as PostgreSQL's
/// `password` method does for a SCRAM-stored password. Both sides of an
/// exchange run in memory, so the password gets exactly a SCRAM client's
/// SASLprep and salting; returns the keys the password proves (SCRAM
/// pass-through to the nodes needs them when no password is configured).
pub(crate) fn scram_password_check(verifier: &ScramVerifier, password: &[u8]) -> Option<ScramKeys> {
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
    let mut client = ScramSha256::new(password, ChannelBinding::unsupported());
    let mut server = ScramServer::new(verifier.clone());
    let data = client.message();
    let mut first = b"SCRAM-SHA-256\0".to_vec();
    first.extend_from_slice(&i32::try_from(data.len()).ok()?.to_be_bytes());
    first.extend_from_slice(data);
    let server_first = server.client_first(&first).ok()?;
    client.update(&server_first).ok()?;
    server.client_final(client.message()).ok()?;
    server.proven_keys()
}

/// Check a client's MD5 PasswordMessage body: libpq's response for `user` and
/// `password` with `salt` (`"md5" + md5(md5(password + user) + salt)`).
pub(crate) fn md5_check(user: &str, password: &str, salt: [u8; 4], body: &[u8]) -> bool {
    let Some((response, _)) = cstr(body) else {
        return false;
    };
    let expected = md5_hash(user.as_bytes(), password.as_bytes(), salt);
    ct_eq(expected.as_bytes(), response)
}

/// libpq's answer to an MD5 challenge with `salt`, computed from the stored
/// hash (`"md5"` + hex md5(password + user), as in `pg_authid`) instead of
/// the password: `"md5" + md5(hex + salt)`. What a node needs for a user
/// whose password pgpilot knows only as that hash.
pub(crate) fn md5_salted_from_stored(stored: &str, salt: [u8; 4]) -> String {
    use md5::{Digest, Md5};
    let hex = stored.strip_prefix("md5").unwrap_or(stored);
    let mut h = Md5::new();
    h.update(hex.as_bytes());
    h.update(salt);
    let mut out = String::with_capacity(35);
    out.push_str("md5");
    for b in h.finalize() {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Check a client's MD5 PasswordMessage body against a stored MD5 hash.
pub(crate) fn md5_check_stored(stored: &str, salt: [u8; 4], body: &[u8]) -> bool {
    let Some((response, _)) = cstr(body) else {
        return false;
    };
    ct_eq(md5_salted_from_stored(stored, salt).as_bytes(), response)
}

/// Whether a clear-text password matches a stored MD5 hash of `user`.
pub(crate) fn md5_password_check(user: &str, stored: &str, password: &[u8]) -> bool {
    let hashed = postgres_protocol::password::md5(password, user);
    ct_eq(hashed.as_bytes(), stored.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    fn exchange(verifier: ScramVerifier, password: &str) -> Result<(), AuthError> {
        let mut client = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
        let mut server = ScramServer::new(verifier);
        let mut initial = b"SCRAM-SHA-256\0".to_vec();
        initial.extend_from_slice(&(client.message().len() as i32).to_be_bytes());
        initial.extend_from_slice(client.message());
        let first = server.client_first(&initial)?;
        client.update(&first).unwrap();
        let last = server.client_final(client.message())?;
        client
            .finish(&last)
            .expect("client accepts the server signature");
        Ok(())
    }

    #[test]
    fn scram_accepts_the_right_password_only() {
        let v = ScramVerifier::from_password("secret");
        assert_eq!(exchange(v.clone(), "secret"), Ok(()));
        assert_eq!(exchange(v, "wrong"), Err(AuthError::Failed));
        let mock = ScramVerifier::mock("nobody", b"k");
        assert_eq!(exchange(mock, ""), Err(AuthError::Failed));
    }

    /// One exchange with `mechanism` and the client's `binding`, against a
    /// server that offered PLUS bound to `end_point` (or did not: `None`).
    fn bound_exchange(
        mechanism: &str,
        binding: ChannelBinding,
        end_point: Option<&[u8]>,
    ) -> Result<(), AuthError> {
        let v = ScramVerifier::from_password("secret");
        let mut client = ScramSha256::new(b"secret", binding);
        let mut server = match end_point {
            Some(e) => ScramServer::with_channel_binding(v, e.to_vec()),
            None => ScramServer::new(v),
        };
        let mut initial = format!("{mechanism}\0").into_bytes();
        initial.extend_from_slice(&(client.message().len() as i32).to_be_bytes());
        initial.extend_from_slice(client.message());
        client
            .update(&server.client_first(&initial)?)
            .map_err(|_| AuthError::Failed)?;
        let last = server.client_final(client.message())?;
        client.finish(&last).map_err(|_| AuthError::Failed)
    }

    #[test]
    fn channel_binding_is_checked_and_cannot_be_downgraded() {
        let ep: &[u8] = &[7u8; 32];
        let bound = || ChannelBinding::tls_server_end_point(ep.to_vec());
        // PLUS with the certificate's hash: in.
        assert_eq!(
            bound_exchange("SCRAM-SHA-256-PLUS", bound(), Some(ep)),
            Ok(())
        );
        // Bound to another certificate (a man in the middle's): refused.
        let other = ChannelBinding::tls_server_end_point(vec![8u8; 32]);
        assert!(bound_exchange("SCRAM-SHA-256-PLUS", other, Some(ep)).is_err());
        // PLUS not offered (no TLS): the mechanism is unknown.
        assert!(bound_exchange("SCRAM-SHA-256-PLUS", bound(), None).is_err());
        // Plain SCRAM over TLS by a client that cannot bind ("n"): in.
        let none = ChannelBinding::unsupported();
        assert_eq!(bound_exchange("SCRAM-SHA-256", none, Some(ep)), Ok(()));
        // "y" (it could bind, but thinks the server cannot) while PLUS was
        // offered: a downgrade, refused; without the offer it is fine.
        let y = || ChannelBinding::unrequested();
        assert_eq!(
            bound_exchange("SCRAM-SHA-256", y(), Some(ep)),
            Err(AuthError::Malformed(
                "SCRAM channel binding negotiation error: the client supports channel binding but thinks the server does not, although it does"
            ))
        );
        assert_eq!(bound_exchange("SCRAM-SHA-256", y(), None), Ok(()));
        // Binding data under the plain mechanism: refused.
        assert!(bound_exchange("SCRAM-SHA-256", bound(), Some(ep)).is_err());
    }

    #[test]
    fn proven_keys_log_in_to_a_server_with_the_same_verifier_only() {
        let v = ScramVerifier::from_password("secret");
        // A client logs in to pgpilot with the password…
        let mut client = ScramSha256::new(b"secret", ChannelBinding::unsupported());
        let mut server = ScramServer::new(v.clone());
        let mut initial = b"SCRAM-SHA-256\0".to_vec();
        initial.extend_from_slice(&(client.message().len() as i32).to_be_bytes());
        initial.extend_from_slice(client.message());
        client
            .update(&server.client_first(&initial).unwrap())
            .unwrap();
        assert_eq!(server.proven_keys(), None);
        server.client_final(client.message()).unwrap();
        let keys = server.proven_keys().expect("keys after a good proof");
        // …and pgpilot logs in with its keys to a node storing that verifier.
        let login = |verifier: ScramVerifier, keys: ScramKeys| {
            let (mut c, first) = ScramKeyClient::new(keys);
            let mut node = ScramServer::new(verifier);
            let mut initial = b"SCRAM-SHA-256\0".to_vec();
            initial.extend_from_slice(&(first.len() as i32).to_be_bytes());
            initial.extend_from_slice(&first);
            let last = c.server_first(&node.client_first(&initial)?)?;
            c.server_final(&node.client_final(&last)?)
        };
        assert_eq!(login(v.clone(), keys.clone()), Ok(()));
        // Another verifier of the same password (another salt) is told apart.
        let other = ScramVerifier::from_password("secret");
        assert_eq!(login(other, keys.clone()), Err(AuthError::VerifierMismatch));
        // Wrong keys, or a server that does not hold the verifier, fail.
        let mut wrong = keys.clone();
        wrong.client_key[0] ^= 1;
        assert_eq!(login(v.clone(), wrong), Err(AuthError::Failed));
        let impostor = ScramVerifier {
            server_key: [7; 32],
            ..v.clone()
        };
        assert_eq!(login(impostor, keys), Err(AuthError::Failed));
    }

    #[test]
    fn verifier_parsing() {
        assert!(ScramVerifier::parse("SCRAM-SHA-256$4096:c2FsdA==$x:y").is_none());
        assert!(ScramVerifier::parse("md5abc").is_none());
        let v = ScramVerifier::from_password("p");
        assert_eq!(v.iterations, 4096);
    }

    #[test]
    fn clear_text_passwords_check_against_a_verifier() {
        let v = ScramVerifier::from_password("pässword");
        let keys = scram_password_check(&v, "pässword".as_bytes()).expect("right password");
        assert_eq!(sha256(&keys.client_key), v.stored_key);
        assert!(scram_password_check(&v, b"wrong").is_none());
        assert!(scram_password_check(&v, b"").is_none());
    }

    #[test]
    fn md5_matches_libpq() {
        // libpq's answer for this user, password and salt (the vector of
        // postgres-protocol's own test).
        let salt = [0x2a, 0x3d, 0x8f, 0xe0];
        let mut body = b"md562af4dd09bbb41884907a838a3233294\0".to_vec();
        assert!(md5_check("md5_user", "password", salt, &body));
        assert!(!md5_check("md5_user", "passwore", salt, &body));
        assert!(!md5_check("md5_usex", "password", salt, &body));
        assert!(!md5_check(
            "md5_user",
            "password",
            [0x2a, 0x3d, 0x8f, 0xe1],
            &body
        ));
        // The same answer from the stored hash, without the password.
        let stored = postgres_protocol::password::md5(b"password", "md5_user");
        assert!(md5_check_stored(&stored, salt, &body));
        assert!(!md5_check_stored(&stored, [0; 4], &body));
        assert!(md5_password_check("md5_user", &stored, b"password"));
        assert!(!md5_password_check("md5_user", &stored, b"passwore"));
        body[5] ^= 1;
        assert!(!md5_check("md5_user", "password", salt, &body));
        assert!(!md5_check_stored(&stored, salt, &body));
        assert!(!md5_check("md5_user", "password", salt, b"no terminator"));
    }
}
