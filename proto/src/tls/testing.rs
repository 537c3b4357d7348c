//! Certificates for tests of TLS: a throwaway CA and the server
//! certificates it signs, as PEM files in a directory (rcgen).
#![allow(clippy::expect_used)]

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA that exists only for one test.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

/// A server certificate's files.
#[derive(Debug, Clone)]
pub struct ServerFiles {
    /// The certificate chain (the leaf, then the CA), PEM.
    pub certificate: PathBuf,
    /// The leaf's private key, PEM.
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA with a fresh key.
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "ferry test CA");
        let key = KeyPair::generate().expect("a CA key");
        TestCa { issuer: CertifiedIssuer::self_signed(params, key).expect("a CA certificate") }
    }

    /// The CA's certificate, PEM.
    pub fn certificate_pem(&self) -> String {
        self.issuer.pem()
    }

    /// Writes the CA's certificate to `path`.
    pub fn write_certificate(&self, path: &Path) -> PathBuf {
        std::fs::write(path, self.certificate_pem()).expect("writing the CA certificate");
        path.to_owned()
    }

    /// A server certificate for `names` (host names or IP addresses) signed
    /// by this CA, written into `dir` as `<stem>.pem` and `<stem>.key`.
    pub fn server(&self, names: &[&str], dir: &Path, stem: &str) -> ServerFiles {
        let names: Vec<String> = names.iter().map(|name| (*name).to_owned()).collect();
        let params = CertificateParams::new(names).expect("server certificate parameters");
        let key = KeyPair::generate().expect("a server key");
        let certificate = params.signed_by(&key, &self.issuer).expect("a server certificate");
        let files = ServerFiles {
            certificate: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.certificate, certificate.pem() + &self.certificate_pem())
            .expect("writing the server certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("writing the server key");
        files
    }
}

impl Default for TestCa {
    fn default() -> TestCa {
        TestCa::new()
    }
}
