//! TLS settings, both sides: `[tls]` towards clients and `[backend_tls]`
//! towards the nodes, and the rustls configurations built from the
//! certificate files they name (re-read with the rest of the configuration
//! on SIGHUP).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

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
        let leaf = certs[0].clone();
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| format!("{}: {e}", cert_file.display()))?;
        // PostgreSQL 17's direct TLS requires it; over SSLRequest it is optional.
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(Some(Arc::new(TlsServer {
            config: Arc::new(config),
            leaf,
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
    /// The certificate served (its hash is the `tls-server-end-point`
    /// channel binding data).
    pub leaf: CertificateDer<'static>,
    /// The mode in force (never `Disable`).
    pub mode: TlsMode,
}

impl std::fmt::Debug for TlsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsServer")
            .field("mode", &self.mode)
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

/// How pgpilot's own connections to the nodes use TLS (libpq's `sslmode`
/// words).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackendTlsMode {
    /// Plaintext.
    #[default]
    Disable,
    /// TLS when the node offers it, plaintext otherwise; no verification.
    Prefer,
    /// TLS, or no connection; the certificate is not verified.
    Require,
    /// TLS with a certificate that chains to `root_cert_file`.
    VerifyCa,
    /// As `verify-ca`, and the certificate names the host connected to.
    VerifyFull,
}

impl BackendTlsMode {
    /// libpq's `sslmode` value for the same behaviour.
    pub fn sslmode(self) -> &'static str {
        match self {
            BackendTlsMode::Disable => "disable",
            BackendTlsMode::Prefer => "prefer",
            BackendTlsMode::Require => "require",
            BackendTlsMode::VerifyCa => "verify-ca",
            BackendTlsMode::VerifyFull => "verify-full",
        }
    }
}

/// `[backend_tls]`: TLS from pgpilot to the nodes.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendTlsSettings {
    /// `disable` (default), `prefer`, `require`, `verify-ca` or `verify-full`.
    pub mode: BackendTlsMode,
    /// CA certificates (PEM) the nodes' certificates are verified against
    /// (`verify-ca`, `verify-full`).
    pub root_cert_file: Option<PathBuf>,
    /// A client certificate (PEM) for nodes whose pg_hba says `cert`.
    pub cert_file: Option<PathBuf>,
    /// Its key.
    pub key_file: Option<PathBuf>,
}

/// What connecting to a node over TLS needs, built at load.
pub struct BackendTls {
    /// The mode in force (never `Disable`).
    pub mode: BackendTlsMode,
    /// The rustls configuration of every node connection.
    pub config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl BackendTlsSettings {
    /// Make relative paths relative to `dir` (the config file's directory).
    pub(crate) fn resolve(&mut self, dir: &Path) {
        for p in [
            &mut self.root_cert_file,
            &mut self.cert_file,
            &mut self.key_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() && !p.as_os_str().is_empty() {
                *p = dir.join(&*p);
            }
        }
    }

    /// Read the files and build the client side, or `None` when disabled.
    pub(crate) fn load(&self) -> Result<Option<Arc<BackendTls>>, String> {
        use rustls::client::danger::ServerCertVerifier;
        if self.mode == BackendTlsMode::Disable {
            return Ok(None);
        }
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
            .map_err(|e| e.to_string())?;
        let webpki = match &self.root_cert_file {
            Some(file) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in read_certs(file)? {
                    roots
                        .add(c)
                        .map_err(|e| format!("{}: {e}", file.display()))?;
                }
                let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .map_err(|e| format!("{}: {e}", file.display()))?;
                Some(v)
            }
            None if matches!(
                self.mode,
                BackendTlsMode::VerifyCa | BackendTlsMode::VerifyFull
            ) =>
            {
                return Err(
                    "backend_tls mode verify-ca and verify-full need root_cert_file".into(),
                );
            }
            None => None,
        };
        let verifier: Arc<dyn ServerCertVerifier> = match (self.mode, webpki) {
            (BackendTlsMode::VerifyFull, Some(v)) => v,
            (BackendTlsMode::VerifyCa, Some(v)) => Arc::new(verify::ChainOnly(v)),
            _ => Arc::new(verify::Unverified(provider)),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let certs = read_certs(cert)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| format!("{}: no private key ({e})", key.display()))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| format!("{}: {e}", cert.display()))?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err("backend_tls cert_file and key_file go together".into()),
        };
        Ok(Some(Arc::new(BackendTls {
            mode: self.mode,
            config: Arc::new(config),
        })))
    }
}

/// A client configuration that accepts any server certificate (libpq's
/// `sslmode=require`): for `pgpilot`'s admin subcommands, which talk to the
/// pgpilot the same file configures, usually over loopback.
pub fn unverified_client() -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verify::Unverified(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The certificate checks of `require` and `verify-ca`, which libpq makes
/// and rustls does not offer as such.
mod verify {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{CertificateError, DigitallySignedStruct, Error, SignatureScheme};

    /// `require`: any certificate (the handshake's signatures are still
    /// checked, so the peer holds the certificate's key).
    #[derive(Debug)]
    pub(super) struct Unverified(pub(super) Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for Unverified {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    /// `verify-ca`: the chain must verify; the name need not match.
    #[derive(Debug)]
    pub(super) struct ChainOnly(pub(super) Arc<rustls::client::WebPkiServerVerifier>);

    impl ServerCertVerifier for ChainOnly {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            name: &ServerName<'_>,
            ocsp: &[u8],
            now: UnixTime,
        ) -> Result<ServerCertVerified, Error> {
            match self
                .0
                .verify_server_cert(end_entity, intermediates, name, ocsp, now)
            {
                Err(Error::InvalidCertificate(
                    CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. },
                )) => Ok(ServerCertVerified::assertion()),
                other => other,
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
