//! TLS towards clients: the `[tls]` settings, and the rustls server
//! configuration built from the certificate files they name (re-read with
//! the rest of the configuration on SIGHUP), with what SCRAM channel binding
//! and `cert` authentication need from certificates (RFC 5929's
//! `tls-server-end-point` hash, a subject's common name).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use sha2::Digest;

/// Whether clients may, or must, use TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// SSLRequest is answered `N`; direct TLS is refused.
    Disable,
    /// TLS when the client asks for it, plaintext otherwise.
    Allow,
    /// Plaintext logins are refused with 28000.
    Require,
}

/// `[tls]`: client-side TLS.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSettings {
    /// The server certificate chain (PEM), relative to the config file.
    pub cert_file: Option<PathBuf>,
    /// Its private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM) that client certificates are verified against;
    /// absent: no client certificate is asked for.
    pub ca_file: Option<PathBuf>,
    /// `disable`, `allow` or `require`; default `allow` with a certificate,
    /// else `disable`.
    pub mode: Option<TlsMode>,
}

impl TlsSettings {
    /// The mode in force.
    pub fn mode(&self) -> TlsMode {
        self.mode.unwrap_or(if self.cert_file.is_some() {
            TlsMode::Allow
        } else {
            TlsMode::Disable
        })
    }

    /// Make relative paths relative to `dir` (the config file's directory).
    pub(crate) fn resolve(&mut self, dir: &Path) {
        for p in [&mut self.cert_file, &mut self.key_file, &mut self.ca_file]
            .into_iter()
            .flatten()
        {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = dir.join(&*p);
            }
        }
    }

    /// Read the files and build the server side, or `None` when TLS is off.
    pub(crate) fn load(&self) -> Result<Option<Arc<TlsServer>>, String> {
        if self.mode() == TlsMode::Disable {
            return Ok(None);
        }
        let (Some(cert_file), Some(key_file)) = (&self.cert_file, &self.key_file) else {
            return Err("mode allow or require needs cert_file and key_file".into());
        };
        let certs = read_certs(cert_file)?;
        let key = PrivateKeyDer::from_pem_file(key_file)
            .map_err(|e| format!("{}: no private key ({e})", key_file.display()))?;
        let provider = provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
            .map_err(|e| e.to_string())?;
        let builder = match &self.ca_file {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(ca)? {
                    roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
                }
                // A certificate is verified when offered; whether one is
                // needed is the hba line's business (`cert`).
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .allow_unauthenticated()
                .build()
                .map_err(|e| format!("{}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let end_point = end_point_hash(&certs[0]);
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("{}: {e}", cert_file.display()))?;
        // PostgreSQL 17's direct TLS requires it; over SSLRequest it is optional.
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Some(Arc::new(TlsServer {
            config: Arc::new(config),
            end_point,
            mode: self.mode(),
        })))
    }
}

/// The crypto provider: *ring*, which builds from crates alone in seconds
/// (aws-lc-rs needs cmake and minutes of C). Deprecated by rustls only for
/// lacking post-quantum key exchange.
#[allow(deprecated)]
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The ALPN protocol name PostgreSQL uses.
pub const ALPN: &[u8] = b"postgresql";

/// What accepting a TLS client needs, built at load.
pub struct TlsServer {
    /// The rustls configuration handed to each accept.
    pub config: Arc<rustls::ServerConfig>,
    /// `tls-server-end-point` channel binding data of the certificate, when
    /// its signature algorithm defines one (else SCRAM-SHA-256-PLUS is not
    /// offered).
    pub end_point: Option<Vec<u8>>,
    /// The mode in force (never `Disable`).
    pub mode: TlsMode,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("mode", &self.mode)
            .field("channel_binding", &self.end_point.is_some())
            .finish_non_exhaustive()
    }
}

/// Every certificate in a PEM file (at least one).
pub(crate) fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate", path.display()));
    }
    Ok(certs)
}

/// One DER element: (tag, contents, what follows). `None` on malformed input.
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// RFC 5929 `tls-server-end-point`: the certificate's hash with its signature
/// algorithm's hash, SHA-256 for MD5 and SHA-1; `None` for algorithms that
/// name none (Ed25519, RSA-PSS), as PostgreSQL then offers no channel binding.
pub fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
    let (SEQUENCE, body, _) = der(cert)? else {
        return None;
    };
    let (SEQUENCE, _tbs, rest) = der(body)? else {
        return None;
    };
    let (SEQUENCE, alg, _) = der(rest)? else {
        return None;
    };
    let (OID, oid, _) = der(alg)? else {
        return None;
    };
    // 1.2.840.113549.1.1.{4,5,11,12,13,14} and 1.2.840.10045.4.{1,3.2,3.3,3.4}
    const RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04];
    enum H {
        S256,
        S384,
        S512,
    }
    let h = match oid {
        [p @ .., last] if p == RSA => match last {
            4 | 5 | 11 | 14 => H::S256,
            12 => H::S384,
            13 => H::S512,
            _ => return None,
        },
        [p @ .., 1] if p == ECDSA => H::S256,
        [p @ .., 3, last] if p == ECDSA => match last {
            1 | 2 => H::S256,
            3 => H::S384,
            4 => H::S512,
            _ => return None,
        },
        _ => return None,
    };
    Some(match h {
        H::S256 => sha2::Sha256::digest(cert).to_vec(),
        H::S384 => sha2::Sha384::digest(cert).to_vec(),
        H::S512 => sha2::Sha512::digest(cert).to_vec(),
    })
}

/// The subject's common name (the last CN attribute, as PostgreSQL takes
/// it), for `cert` authentication.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let (SEQUENCE, body, _) = der(cert)? else {
        return None;
    };
    let (SEQUENCE, tbs, _) = der(body)? else {
        return None;
    };
    let mut fields = tbs;
    // [0] version is optional.
    if fields.first() == Some(&0xa0) {
        fields = der(fields)?.2;
    }
    // serial, signature, issuer, validity, subject.
    for _ in 0..4 {
        fields = der(fields)?.2;
    }
    let (SEQUENCE, mut rdns, _) = der(fields)? else {
        return None;
    };
    let mut cn = None;
    while !rdns.is_empty() {
        let (SET, mut set, rest) = der(rdns)? else {
            return None;
        };
        rdns = rest;
        while !set.is_empty() {
            let (SEQUENCE, atv, rest) = der(set)? else {
                return None;
            };
            set = rest;
            let (OID, oid, value) = der(atv)? else {
                return None;
            };
            if oid == [0x55, 0x04, 0x03] {
                let (_, text, _) = der(value)?;
                cn = Some(String::from_utf8(text.to_vec()).ok()?);
            }
        }
    }
    cn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn end_point_hash_and_common_name_of_a_generated_certificate() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "pgpilot tests");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "alice");
        let cert = params.self_signed(&key).unwrap();
        let der = cert.der();
        // rcgen signs with ECDSA P-256 SHA-256.
        assert_eq!(
            end_point_hash(der).unwrap(),
            sha2::Sha256::digest(der).to_vec()
        );
        assert_eq!(common_name(der).as_deref(), Some("alice"));
        let ed = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let cert = params.self_signed(&ed).unwrap();
        assert_eq!(end_point_hash(cert.der()), None);
        assert_eq!(common_name(cert.der()).as_deref(), Some("alice"));
        for bad in [&[][..], &[0x30, 0x81], &der[..der.len() / 2]] {
            assert_eq!(end_point_hash(bad), None);
            assert_eq!(common_name(bad), None);
        }
    }

    #[test]
    fn the_mode_defaults_by_the_certificate() {
        let mut s = TlsSettings::default();
        assert_eq!(s.mode(), TlsMode::Disable);
        assert!(s.load().unwrap().is_none());
        s.cert_file = Some("c.pem".into());
        assert_eq!(s.mode(), TlsMode::Allow);
        assert!(s.load().is_err(), "no key_file");
    }
}
