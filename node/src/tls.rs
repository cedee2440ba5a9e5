//! Mutual TLS between the tiers: the fleet CA, this node's certificate, and the revocation
//! list, loaded, checked, and swapped whole by a reload.
//!
//! An upper's data listener requires a client certificate that chains to the fleet CA and is
//! not revoked (rustls checks this on every full handshake). A resumed session skips that
//! check — rustls restores the peer's certificates from the session ID cache or the ticket
//! without verifying them again — so the revocation list in force is also applied **to every
//! request**: the handshake records the peer's chain on the connection, and before a request
//! is served the chain is verified again whenever the trust material changed since it was last
//! verified ([`FleetTls::peer_names`]). A certificate revoked after its session began gets no
//! service, whether the session is resumed by ID, by ticket, or simply kept alive.
//!
//! The peer's identity is the DNS names of its certificate; an upper serves a control context
//! only when its sender is one of them. Lowers verify an upper's certificate against the same
//! CA (and its name, when the member's `name` is configured).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora_core::listeners::TlsAccept;
use pingora_core::protocols::tls::TlsRef;
use pingora_core::utils::tls::{CertKey, WrappedX509};
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::UnixTime;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};

/// The SNI a lower sends an upper whose `name` it does not know (its certificate is then
/// checked against the fleet CA only).
pub const UNNAMED_UPPER_SNI: &str = "stratus-upper";

/// `[tier.tls]` as loaded: DER material, checked to fit together.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// The fleet CA certificates: every peer must chain to one.
    pub ca: Vec<Vec<u8>>,
    /// This node's certificate, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// This node's private key (PKCS#8, SEC1 or PKCS#1 DER).
    pub key: Vec<u8>,
    /// Revocation lists issued by the CA (DER).
    pub crls: Vec<Vec<u8>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca", &self.ca.len())
            .field("chain", &self.chain.len())
            .field("crls", &self.crls.len())
            .finish_non_exhaustive()
    }
}

/// The files of `[tier.tls]`, each reported under its own key when it is wrong.
pub struct TlsFiles<'a> {
    /// `ca`: PEM certificates.
    pub ca: &'a Path,
    /// `cert`: PEM certificate chain, leaf first.
    pub cert: &'a Path,
    /// `key`: PEM private key, private to its owner.
    pub key: &'a Path,
    /// `crl`: PEM (or DER) revocation lists, optional.
    pub crl: Option<&'a Path>,
}

/// Files a problem under `key`.
fn at(key: &'static str) -> impl Fn(String) -> (String, String) {
    move |m| (key.to_string(), m)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn pem_certs(path: &Path) -> Result<Vec<Vec<u8>>, String> {
    let bytes = read(path)?;
    let certs: Vec<Vec<u8>> = rustls_pemfile::certs(&mut bytes.as_slice())
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    for c in &certs {
        x509_parser::parse_x509_certificate(c)
            .map_err(|e| format!("{}: a certificate does not parse: {e}", path.display()))?;
    }
    Ok(certs)
}

/// The private key in a PEM file no other user may read (DER).
fn pem_key(path: &Path) -> Result<Vec<u8>, String> {
    let pem = crate::config::read_private_file(path)?;
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(k)) => Ok(k.secret_der().to_vec()),
        _ => Err(format!("{}: no PEM private key in it", path.display())),
    }
}

impl TlsMaterial {
    /// Loads and checks `[tier.tls]`: the key is private and matches the certificate, the
    /// certificate chains to the CA, is not revoked, is valid now and names `node_name`.
    /// Errors come as `(key, message)`.
    pub fn load(files: &TlsFiles<'_>, node_name: &str) -> Result<TlsMaterial, (String, String)> {
        let ca = pem_certs(files.ca).map_err(at("ca"))?;
        let chain = pem_certs(files.cert).map_err(at("cert"))?;
        let key = pem_key(files.key).map_err(at("key"))?;
        let crls = match files.crl {
            None => Vec::new(),
            Some(path) => {
                let bytes = read(path).map_err(at("crl"))?;
                let pem: Vec<Vec<u8>> = rustls_pemfile::crls(&mut bytes.as_slice())
                    .map(|c| c.map(|c| c.to_vec()))
                    .collect::<Result<_, _>>()
                    .map_err(|e| at("crl")(format!("{}: not a PEM CRL: {e}", path.display())))?;
                if pem.is_empty() {
                    vec![bytes]
                } else {
                    pem
                }
            }
        };
        let material = TlsMaterial {
            ca,
            chain,
            key,
            crls,
        };
        let state = TlsState::build(&material, 0).map_err(|(k, m)| (k.to_string(), m))?;
        let leaf = CertificateDer::from(material.chain[0].clone());
        let rest: Vec<CertificateDer<'static>> = material.chain[1..]
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let name = ServerName::try_from(node_name.to_string()).map_err(|_| {
            at("cert")(format!(
                "node.name {node_name:?} is not a DNS name a certificate can carry"
            ))
        })?;
        // Checked as each side will: as a client certificate (chain, validity, revocation)
        // and as a server certificate for this node's name.
        state
            .verifier
            .verify_client_cert(&leaf, &rest, UnixTime::now())
            .map_err(|e| at("cert")(format!("{}: {e}", files.cert.display())))?;
        state
            .server_verifier
            .verify_server_cert(&leaf, &rest, &name, &[], UnixTime::now())
            .map_err(|e| {
                at("cert")(format!(
                    "{} as a server certificate for {node_name:?}: {e}",
                    files.cert.display()
                ))
            })?;
        Ok(material)
    }
}

/// One generation of trust material and what is built from it.
struct TlsState {
    generation: u64,
    verifier: Arc<dyn ClientCertVerifier>,
    /// How an upper's certificate is checked (CA and CRLs; by name when it is known).
    server_verifier: Arc<rustls::client::WebPkiServerVerifier>,
    certified: Arc<CertifiedKey>,
    client: Arc<rustls::ClientConfig>,
    client_any_name: Arc<rustls::ClientConfig>,
    peer_ca: Arc<[WrappedX509]>,
    cert_key: Arc<CertKey>,
    /// Serials the CRLs revoke, as pingora's TLS digest writes a peer's serial.
    revoked: std::collections::HashSet<String>,
}

fn crls_der(m: &TlsMaterial) -> Vec<CertificateRevocationListDer<'static>> {
    m.crls
        .iter()
        .map(|c| CertificateRevocationListDer::from(c.clone()))
        .collect()
}

/// The serial numbers the CRLs revoke, formatted like pingora's digest of a peer certificate.
fn revoked_serials(m: &TlsMaterial) -> std::collections::HashSet<String> {
    m.crls
        .iter()
        .filter_map(|c| x509_parser::parse_x509_crl(c).ok())
        .flat_map(|(_, crl)| {
            crl.iter_revoked_certificates()
                .map(|r| r.raw_serial_as_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

impl TlsState {
    fn build(m: &TlsMaterial, generation: u64) -> Result<TlsState, (&'static str, String)> {
        let mut roots = RootCertStore::empty();
        for c in &m.ca {
            roots
                .add(CertificateDer::from(c.clone()))
                .map_err(|e| ("ca", format!("not a usable CA certificate: {e}")))?;
        }
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots.clone()), provider())
                .with_crls(crls_der(m))
                .build()
                .map_err(|e| ("crl", format!("{e}")))?;
        let chain: Vec<CertificateDer<'static>> = m
            .chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        let key = PrivateKeyDer::try_from(m.key.clone())
            .map_err(|e| ("key", format!("not a private key: {e}")))?;
        let certified = certified_key(&m.chain, &m.key)?;
        // An upper's certificate is checked against the CRLs too (probes, purges).
        let server_verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots.clone()),
            provider(),
        )
        .with_crls(crls_der(m))
        .build()
        .map_err(|e| ("crl", e.to_string()))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ("ca", e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(server_verifier.clone())
            .with_client_auth_cert(chain.clone(), key.clone_key())
            .map_err(|e| ("key", format!("{e}")))?;
        let client_any_name = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| ("ca", e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyFleetName(server_verifier.clone())))
            .with_client_auth_cert(chain, key)
            .map_err(|e| ("key", format!("{e}")))?;
        let peer_ca: Arc<[WrappedX509]> =
            m.ca.iter()
                .map(|c| WrappedX509::new(c.clone(), pingora_core::utils::tls::parse_x509))
                .collect::<Vec<_>>()
                .into();
        Ok(TlsState {
            generation,
            verifier,
            server_verifier,
            certified,
            client: Arc::new(client),
            client_any_name: Arc::new(client_any_name),
            peer_ca,
            cert_key: Arc::new(CertKey::new(m.chain.clone(), m.key.clone())),
            revoked: revoked_serials(m),
        })
    }
}

/// A certificate chain and its key, ready to serve: the key must match the certificate.
fn certified_key(
    chain: &[Vec<u8>],
    key: &[u8],
) -> Result<Arc<CertifiedKey>, (&'static str, String)> {
    let chain: Vec<CertificateDer<'static>> = chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let key = PrivateKeyDer::try_from(key.to_vec())
        .map_err(|e| ("key", format!("not a private key: {e}")))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| ("key", format!("not a usable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| ("key", format!("does not match cert: {e}")))?;
    Ok(Arc::new(certified))
}

/// A certificate for clients (`[tls]`): loaded, its key private and matching.
#[derive(Clone)]
pub struct SiteCert {
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
    /// What the listener serves.
    pub certified: Arc<CertifiedKey>,
}

impl PartialEq for SiteCert {
    fn eq(&self, other: &SiteCert) -> bool {
        self.chain == other.chain && self.key == other.key
    }
}

impl std::fmt::Debug for SiteCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SiteCert")
            .field("chain", &self.chain.len())
            .finish_non_exhaustive()
    }
}

impl SiteCert {
    /// Loads `cert` (PEM chain) and `key` (PEM, private to its owner); errors as `(key,
    /// message)`.
    pub fn load(cert: &Path, key: &Path) -> Result<SiteCert, (String, String)> {
        let chain = pem_certs(cert).map_err(at("cert"))?;
        let key = pem_key(key).map_err(at("key"))?;
        let certified = certified_key(&chain, &key).map_err(|(k, m)| (k.to_string(), m))?;
        Ok(SiteCert {
            chain,
            key,
            certified,
        })
    }
}

/// Listener settings for a lower's HTTPS port: the certificate of the config in force (so a
/// reload swaps it for new handshakes), HTTP/2 and HTTP/1.1 offered by ALPN.
pub fn client_listener_settings(
    live: crate::config::Live,
) -> anyhow::Result<pingora_core::listeners::tls::TlsSettings> {
    let mut settings = pingora_core::listeners::tls::TlsSettings::intermediate("", "")
        .map_err(|e| anyhow::anyhow!("tls listener: {e}"))?;
    settings.set_cert_resolver(Arc::new(LiveSiteCert(live)));
    settings.enable_h2();
    Ok(settings)
}

/// The `[tls]` certificate of the config in force.
struct LiveSiteCert(crate::config::Live);

impl std::fmt::Debug for LiveSiteCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveSiteCert")
    }
}

impl ResolvesServerCert for LiveSiteCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.load().tls.as_ref().map(|t| t.cert.certified.clone())
    }
}

/// The live mutual-TLS state of a node: what its listener, its peers and its request checks
/// use, replaced whole by a reload.
pub struct FleetTls {
    state: ArcSwap<TlsState>,
    generations: AtomicU64,
}

impl FleetTls {
    /// The state for `material` (already checked by [`TlsMaterial::load`]).
    pub fn new(material: &TlsMaterial) -> anyhow::Result<Arc<FleetTls>> {
        let state =
            TlsState::build(material, 1).map_err(|(k, m)| anyhow::anyhow!("tier.tls.{k}: {m}"))?;
        Ok(Arc::new(FleetTls {
            state: ArcSwap::from_pointee(state),
            generations: AtomicU64::new(1),
        }))
    }

    /// Puts reloaded material in force: new handshakes and every later request are checked
    /// against it (a revoked peer on a resumed or kept-alive session included).
    pub fn reload(&self, material: &TlsMaterial) -> anyhow::Result<()> {
        let generation = self.generations.fetch_add(1, Ordering::AcqRel) + 1;
        let state = TlsState::build(material, generation)
            .map_err(|(k, m)| anyhow::anyhow!("tier.tls.{k}: {m}"))?;
        self.state.store(Arc::new(state));
        Ok(())
    }

    /// Listener settings for an upper's data port: client certificates required, this
    /// node's certificate served, session resumption by ID and by ticket.
    pub fn listener_settings(
        self: &Arc<Self>,
    ) -> anyhow::Result<pingora_core::listeners::tls::TlsSettings> {
        let recorder: Box<dyn TlsAccept + Send + Sync> = Box::new(PeerRecorder);
        let mut settings = pingora_core::listeners::tls::TlsSettings::with_callbacks(recorder)
            .map_err(|e| anyhow::anyhow!("tls listener: {e}"))?;
        settings.set_client_cert_verifier(Arc::new(LiveVerifier(self.clone())));
        settings.set_cert_resolver(Arc::new(LiveCert(self.clone())));
        let ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| anyhow::anyhow!("session tickets: {e}"))?;
        settings.customize(move |config| config.ticketer = ticketer);
        Ok(settings)
    }

    /// The client config for this node's own connections to an upper (probes, purges):
    /// its certificate must name `name` when the member's name is known, else any name the
    /// fleet CA signed.
    pub fn client_config(&self, name_known: bool) -> Arc<rustls::ClientConfig> {
        let s = self.state.load();
        if name_known {
            s.client.clone()
        } else {
            s.client_any_name.clone()
        }
    }

    /// What a pingora peer to an upper needs: the fleet CA and this node's certificate.
    pub fn peer_material(&self) -> (Arc<[WrappedX509]>, Arc<CertKey>) {
        let s = self.state.load();
        (s.peer_ca.clone(), s.cert_key.clone())
    }

    /// Whether an upper this node connected to presented a certificate the CRLs in force
    /// revoke (`serial` as pingora's TLS digest gives it). Pingora's connector checks the
    /// chain against the fleet CA but knows no CRL, so the proxy asks this on every connection
    /// it uses, new or reused.
    pub fn upper_revoked(&self, serial: Option<&str>) -> bool {
        serial.is_some_and(|s| self.state.load().revoked.contains(s))
    }

    /// The DNS names of a connection's verified peer certificate, verified again (chain,
    /// validity, revocation) when the trust material changed since it last was. `Err` names
    /// why the peer gets no service.
    pub fn peer_names(&self, peer: &PeerChain) -> Result<Arc<Vec<String>>, &'static str> {
        let state = self.state.load();
        let mut checked = peer.checked.lock();
        if let Some((generation, not_after, names)) = checked.as_ref() {
            // Verified against this trust material, and not expired since.
            if *generation == state.generation && std::time::SystemTime::now() < *not_after {
                return Ok(names.clone());
            }
        }
        let (leaf, rest) = peer.chain.split_first().ok_or("no-client-certificate")?;
        state
            .verifier
            .verify_client_cert(leaf, rest, UnixTime::now())
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked) => {
                    "revoked-certificate"
                }
                _ => "refused-certificate",
            })?;
        let (names, not_after) = leaf_facts(leaf);
        let names = Arc::new(names);
        *checked = Some((state.generation, not_after, names.clone()));
        Ok(names)
    }
}

/// The DNS names (subject alternative names, lowercased) of a certificate, and when it
/// expires (a certificate that does not parse has no names and is expired).
fn leaf_facts(cert: &CertificateDer<'_>) -> (Vec<String>, std::time::SystemTime) {
    use x509_parser::extensions::GeneralName;
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return (Vec::new(), std::time::UNIX_EPOCH);
    };
    let secs = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
    let not_after = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    let names = match parsed.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    (names, not_after)
}

/// The last verification of a peer chain: the trust generation it passed, the leaf's
/// expiry, and its names.
type Verified = (u64, std::time::SystemTime, Arc<Vec<String>>);

/// A connection's peer certificate chain, recorded at the handshake (full or resumed) and
/// kept on the connection's TLS digest.
pub struct PeerChain {
    chain: Vec<CertificateDer<'static>>,
    checked: parking_lot::Mutex<Option<Verified>>,
}

/// Records the peer's chain on every accepted connection.
struct PeerRecorder;

#[async_trait]
impl TlsAccept for PeerRecorder {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let chain = tls.peer_cert_chain_der()?.to_vec();
        Some(Arc::new(PeerChain {
            chain,
            checked: parking_lot::Mutex::new(None),
        }))
    }
}

/// The client verifier in force, for the listener (built once) to ask.
#[derive(Debug)]
struct LiveVerifier(Arc<FleetTls>);

impl std::fmt::Debug for FleetTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetTls")
            .field("generation", &self.state.load().generation)
            .finish()
    }
}

impl ClientCertVerifier for LiveVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; a fleet node has one certificate to offer anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .state
            .load()
            .verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0
            .state
            .load()
            .verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0
            .state
            .load()
            .verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.state.load().verifier.supported_verify_schemes()
    }
}

/// A server verifier that accepts any name on a certificate the fleet CA signed (for members
/// listed without a `name`); chain, validity and signatures are still checked.
#[derive(Debug)]
struct AnyFleetName(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for AnyFleetName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The certificate in force, for the listener to serve.
#[derive(Debug)]
struct LiveCert(Arc<FleetTls>);

impl ResolvesServerCert for LiveCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.state.load().certified.clone())
    }
}
