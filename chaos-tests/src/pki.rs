//! A throwaway fleet CA for tests: node certificates named by `node.name` (for both server and
//! client use), and revocation lists signed by the CA.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, ExtendedKeyUsagePurpose,
    IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// One CA; certificates it issues get serial numbers 1, 2, …
pub struct FleetPki {
    ca: rcgen::Certificate,
    key: KeyPair,
    next_serial: std::sync::atomic::AtomicU64,
    crl_number: std::sync::atomic::AtomicU64,
}

/// A node's certificate and key, PEM, with the serial a CRL revokes it by.
#[derive(Debug, Clone)]
pub struct NodeCert {
    /// PEM certificate.
    pub cert: String,
    /// PEM private key.
    pub key: String,
    /// Its serial number.
    pub serial: u64,
}

impl FleetPki {
    /// A new CA.
    pub fn new() -> anyhow::Result<FleetPki> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "stratus test fleet CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let ca = params.self_signed(&key)?;
        Ok(FleetPki {
            ca,
            key,
            next_serial: 1.into(),
            crl_number: 1.into(),
        })
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A certificate for `name` (its one DNS name), usable as server and client certificate.
    pub fn issue(&self, name: &str) -> anyhow::Result<NodeCert> {
        let serial = self
            .next_serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut params = CertificateParams::new(vec![name.to_string()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca, &self.key)?;
        Ok(NodeCert {
            cert: cert.pem(),
            key: key.serialize_pem(),
            serial,
        })
    }

    /// A revocation list revoking `serials`, PEM.
    pub fn crl(&self, serials: &[u64]) -> anyhow::Result<String> {
        let now = OffsetDateTime::now_utc();
        let number = self
            .crl_number
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(1),
            next_update: now + Duration::days(1),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: now - Duration::minutes(1),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.ca, &self.key)?.pem()?)
    }

    /// Writes `name`'s certificate, key (0600), the CA and an empty CRL into `dir`; returns
    /// the `[tier.tls]` table naming them.
    pub fn write_node(&self, dir: &Path, name: &str) -> anyhow::Result<(NodeCert, String)> {
        let node = self.issue(name)?;
        write_private(&dir.join("node.key"), &node.key)?;
        std::fs::write(dir.join("node.pem"), &node.cert)?;
        std::fs::write(dir.join("ca.pem"), self.ca_pem())?;
        std::fs::write(dir.join("fleet.crl"), self.crl(&[])?)?;
        let table = format!(
            "[tier.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\ncrl = \"{}\"\n",
            dir.join("ca.pem").display(),
            dir.join("node.pem").display(),
            dir.join("node.key").display(),
            dir.join("fleet.crl").display()
        );
        Ok((node, table))
    }
}

/// Writes a file only its owner may read.
pub fn write_private(path: &Path, body: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, body)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}
