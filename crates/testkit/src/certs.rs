//! Test certificates: a CA and certificates it signs (valid for server and client auth, for
//! `localhost` and `127.0.0.1`, with an identity as the first DNS name), written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    SanType,
};

/// A certificate and key on disk, with its CA's file.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA bundle that signed it.
    pub ca: PathBuf,
}

/// A test CA writing its files into a directory.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    dir: PathBuf,
    name: String,
    ca_file: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `<dir>/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_file = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca_file, cert.pem()).expect("write CA");
        TestCa {
            issuer: Issuer::new(params, key),
            dir: dir.to_path_buf(),
            name: name.to_string(),
            ca_file,
        }
    }

    /// The CA certificate's file.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    /// A certificate for `identity` (its first DNS name; also valid for `localhost` and
    /// `127.0.0.1`), valid now, written as `<dir>/<ca>-<file_stem>.{crt,key}`.
    pub fn issue(&self, identity: &str, file_stem: &str) -> CertFiles {
        self.issue_with(identity, file_stem, false)
    }

    /// As [`TestCa::issue`], but expired (valid only in 2020).
    pub fn issue_expired(&self, identity: &str, file_stem: &str) -> CertFiles {
        self.issue_with(identity, file_stem, true)
    }

    fn issue_with(&self, identity: &str, file_stem: &str, expired: bool) -> CertFiles {
        let mut params =
            CertificateParams::new(vec![identity.to_string(), "localhost".to_string()])
                .expect("leaf params");
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])));
        params.distinguished_name.push(DnType::CommonName, identity);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        let stem = format!("{}-{file_stem}", self.name);
        let files = CertFiles {
            cert: self.dir.join(format!("{stem}.crt")),
            key: self.dir.join(format!("{stem}.key")),
            ca: self.ca_file.clone(),
        };
        std::fs::write(&files.cert, cert.pem()).expect("write certificate");
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        files
    }
}
