//! Certificates for TLS test clusters, made with rcgen: a test CA that
//! issues server certificates (for `127.0.0.1` and `localhost`) and client
//! certificates (common name = the role they log in as).
//!
//! [`LocalCluster::start_tls`](super::LocalCluster::start_tls) writes one set
//! under `<base_dir>/tls/` and turns `ssl = on` on every node with it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{ClusterError, path_str, quote_literal};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// What a TLS test cluster is built with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSpec {
    /// Every TCP line of the nodes' pg_hba.conf is `hostssl`: plaintext
    /// connections (other than the local socket) are refused.
    pub hostssl_only: bool,
    /// Common name of the client certificate made beside the server's.
    pub client_name: String,
}

/// The files of a TLS test cluster (PEM), under `<base_dir>/tls/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The directory.
    pub dir: PathBuf,
    /// The test CA's certificate: the root clients verify servers with.
    pub ca_cert: PathBuf,
    /// The server certificate (127.0.0.1, localhost), signed by the CA.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// The client certificate ([`TlsSpec::client_name`]), signed by the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

/// A certificate authority for tests.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
}

fn err(e: rcgen::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl TestCa {
    /// A new CA named `name`.
    pub fn new(name: &str) -> std::io::Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().map_err(err)?;
        let issuer = CertifiedIssuer::self_signed(params, key).map_err(err)?;
        Ok(TestCa { issuer })
    }

    /// The CA's certificate.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `127.0.0.1` and `localhost`.
    pub fn server(&self, name: &str) -> std::io::Result<Issued> {
        self.issue(
            name,
            vec!["127.0.0.1".into(), "localhost".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate whose common name is `name`.
    pub fn client(&self, name: &str) -> std::io::Result<Issued> {
        self.issue(name, Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        name: &str,
        sans: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
    ) -> std::io::Result<Issued> {
        let mut params = CertificateParams::new(sans).map_err(err)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        let key = KeyPair::generate().map_err(err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(err)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl super::LocalCluster {
    /// Write the certificates of a TLS cluster; returns the postgresql.conf
    /// lines that use them.
    pub(super) fn make_tls(&mut self, spec: &TlsSpec) -> Result<String, ClusterError> {
        let dir = self.base_dir.join("tls");
        fs::create_dir(&dir)?;
        self.chown(&dir)?;
        let files = make_files(&dir, spec, |path, text| {
            fs::write(path, text)?;
            // PostgreSQL refuses a key others may read.
            fs::set_permissions(path, fs::Permissions::from_mode(0o600))?;
            self.chown(path)
        })?;
        let conf = format!(
            "ssl = on\nssl_cert_file = {}\nssl_key_file = {}\nssl_ca_file = {}\n",
            quote_literal(&path_str(&files.server_cert)),
            quote_literal(&path_str(&files.server_key)),
            quote_literal(&path_str(&files.ca_cert)),
        );
        self.tls = Some(files);
        Ok(conf)
    }
}

/// Make a CA, a server and a client certificate and write them into `dir`
/// with `write` (which gives them to the server's OS user).
pub(super) fn make_files(
    dir: &Path,
    spec: &TlsSpec,
    mut write: impl FnMut(&Path, &str) -> std::io::Result<()>,
) -> std::io::Result<TlsFiles> {
    let ca = TestCa::new("pgpilot test CA")?;
    let server = ca.server("localhost")?;
    let client = ca.client(&spec.client_name)?;
    let files = TlsFiles {
        dir: dir.to_path_buf(),
        ca_cert: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    };
    for (path, text) in [
        (&files.ca_cert, &ca.cert_pem()),
        (&files.server_cert, &server.cert_pem),
        (&files.server_key, &server.key_pem),
        (&files.client_cert, &client.cert_pem),
        (&files.client_key, &client.key_pem),
    ] {
        write(path, text)?;
    }
    Ok(files)
}

/// pg_hba.conf with every TCP line made `hostssl`.
pub(super) fn hostssl_only(hba: &str) -> String {
    hba.lines()
        .map(|l| match l.strip_prefix("host ") {
            Some(rest) => format!("hostssl{rest}\n"),
            None => format!("{l}\n"),
        })
        .collect()
}
