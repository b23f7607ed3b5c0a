//! Certificates and TLS configuration.
//!
//! The server's [`Identity`] is a certificate chain and its private key:
//! given as PEM files (a CA-issued certificate), or generated once with
//! rcgen as a self-signed certificate and kept in a state directory. Its
//! [`Fingerprint`] is the SHA-256 of the end-entity certificate (DER).
//!
//! Clients trust a server in one of two ways ([`crate::Trust`]): pin the
//! fingerprint (checked exactly; the handshake signature is still verified
//! against the pinned certificate's key), or verify a chain to a CA
//! certificate they are given, with the usual name checks. Both ends speak
//! TLS 1.3 only, with ALPN [`crate::ALPN`].

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a certificate (DER).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of `cert`.
    pub fn of(cert: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(cert).into())
    }
}

impl fmt::Display for Fingerprint {
    /// `sha256:` and 64 hex digits.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex(&self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Fingerprint {
    type Err = anyhow::Error;

    /// Accepts 64 hex digits, optionally after `sha256:` and with `:`
    /// separators (as `openssl x509 -fingerprint` prints them).
    fn from_str(s: &str) -> anyhow::Result<Fingerprint> {
        let digits: String = s
            .trim()
            .trim_start_matches("sha256:")
            .trim_start_matches("SHA256:")
            .chars()
            .filter(|&c| c != ':')
            .collect();
        if digits.len() != 64 || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            bail!(
                "a certificate fingerprint is 64 hex digits (SHA-256), optionally after 'sha256:'; got '{s}'"
            );
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&digits[2 * i..2 * i + 2], 16)
                .map_err(|e| anyhow!("fingerprint '{s}': {e}"))?;
        }
        Ok(Fingerprint(out))
    }
}

/// A server's certificate chain (end entity first) and private key.
pub struct Identity {
    /// the chain, DER
    pub chain: Vec<CertificateDer<'static>>,
    /// the key, DER
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({})", self.fingerprint())
    }
}

/// File names of the generated identity inside a state directory.
pub const CERT_FILE: &str = "cert.pem";
/// See [`CERT_FILE`].
pub const KEY_FILE: &str = "key.pem";

impl Identity {
    /// A fresh self-signed certificate for `names` (DNS names or IP addresses).
    pub fn self_signed(names: &[&str]) -> anyhow::Result<Identity> {
        let ck = rcgen::generate_simple_self_signed(
            names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .context("generating a self-signed certificate")?;
        let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
            .map_err(|e| anyhow!("generated key: {e}"))?;
        Ok(Identity {
            chain: vec![ck.cert.der().clone()],
            key,
        })
    }

    /// The server's QUIC endpoint settings: its stateless-reset key derived
    /// from its private key (SHA-256, domain-separated), the same across restarts,
    /// so that a restarted server's reset for a connection of its previous
    /// run is recognised and the client learns at once that the session is
    /// gone, instead of after its idle timeout.
    /// The connection ids it issues are keyed the same way, so that the
    /// restarted server recognises them as its own and answers with a reset.
    pub(crate) fn endpoint_config(&self) -> quinn::EndpointConfig {
        use sha2::Digest;
        let derive = |label: &[u8]| {
            let mut h = sha2::Sha256::new();
            h.update(label);
            h.update(self.key.secret_der());
            h.finalize()
        };
        let reset = derive(b"secinfer QUIC stateless reset key v1");
        let cid = derive(b"secinfer QUIC connection id key v1");
        let cid_key = u64::from_le_bytes(cid[..8].try_into().unwrap_or_default());
        let mut config = quinn::EndpointConfig::new(std::sync::Arc::new(ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            &reset,
        )));
        config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        config
    }

    /// Loads `cert.pem` and `key.pem` from `dir`, or generates a self-signed
    /// pair for `localhost`, `127.0.0.1` and `::1` and writes them there
    /// (the key readable only by its owner). Returns whether it generated.
    pub fn load_or_generate(dir: &Path) -> anyhow::Result<(Identity, bool)> {
        let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        if cert.exists() || key.exists() {
            if key.exists() {
                crate::auth::check_private(&key)?;
            }
            return Ok((Identity::from_pem_files(&cert, &key)?, false));
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the state directory {}", dir.display()))?;
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .context("generating a self-signed certificate")?;
        crate::auth::write_private(&key, ck.signing_key.serialize_pem().as_bytes())?;
        std::fs::write(&cert, ck.cert.pem())
            .with_context(|| format!("writing {}", cert.display()))?;
        Ok((Identity::from_pem_files(&cert, &key)?, true))
    }

    /// Reads a PEM certificate chain and a PEM private key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> anyhow::Result<Identity> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| anyhow!("reading certificates from {}: {e}", cert.display()))?;
        if chain.is_empty() {
            bail!("{} holds no PEM certificate", cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| anyhow!("reading the private key from {}: {e}", key.display()))?;
        Ok(Identity { chain, key })
    }

    /// Fingerprint of the end-entity certificate.
    pub fn fingerprint(&self) -> Fingerprint {
        Fingerprint::of(self.chain.first().map(|c| c.as_ref()).unwrap_or(&[]))
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's rustls configuration: TLS 1.3, ALPN, no client certificates
/// (clients authenticate with a token inside the session).
pub(crate) fn server_crypto(identity: &Identity) -> anyhow::Result<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .context("the server certificate and key do not form a usable identity")?;
    cfg.alpn_protocols = vec![crate::ALPN.to_vec()];
    Ok(cfg)
}

/// The client's rustls configuration for a trust choice.
pub(crate) fn client_crypto(trust: &crate::Trust) -> anyhow::Result<rustls::ClientConfig> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut cfg = match trust {
        crate::Trust::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert {
                pinned: *fp,
                provider: provider(),
            }))
            .with_no_client_auth(),
        crate::Trust::CaFile(path) => {
            let mut roots = rustls::RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow!("reading CA certificates from {}: {e}", path.display()))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                bail!("{} holds no usable CA certificate", path.display());
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![crate::ALPN.to_vec()];
    Ok(cfg)
}

/// Accepts exactly one server certificate, by its SHA-256; the handshake
/// signature must still verify with that certificate's key, so only the
/// holder of the private key passes.
#[derive(Debug)]
struct PinnedCert {
    pinned: Fingerprint,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = Fingerprint::of(end_entity);
        if got == self.pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "server certificate fingerprint {got} is not the pinned {}",
                self.pinned
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not accepted".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_the_usual_spellings() {
        let id = Identity::self_signed(&["localhost"]).unwrap();
        let fp = id.fingerprint();
        let shown = fp.to_string();
        assert!(shown.starts_with("sha256:") && shown.len() == 7 + 64);
        assert_eq!(shown.parse::<Fingerprint>().unwrap(), fp);
        let colons: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(colons.join(":").parse::<Fingerprint>().unwrap(), fp);
        assert!("sha256:1234".parse::<Fingerprint>().is_err());
        assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
    }

    #[test]
    fn identity_is_generated_once_per_state_dir() {
        let dir = std::env::temp_dir().join(format!("secinfer-identity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, made) = Identity::load_or_generate(&dir).unwrap();
        assert!(made);
        let (b, made_again) = Identity::load_or_generate(&dir).unwrap();
        assert!(!made_again);
        assert_eq!(a.fingerprint(), b.fingerprint());
        // the private key is the owner's alone
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key.pem has mode {:o}", mode & 0o777);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A server that shows the pinned certificate without its private key
    /// (another key in its place) is not an identity: refused when the
    /// server is configured, before any client could be fooled.
    #[test]
    fn the_pinned_certificate_with_another_key_is_refused() {
        let real = Identity::self_signed(&["localhost"]).unwrap();
        let other = Identity::self_signed(&["localhost"]).unwrap();
        let forged = Identity {
            chain: real.chain.clone(),
            key: other.key.clone_key(),
        };
        assert_eq!(forged.fingerprint(), real.fingerprint());
        let e = format!("{:#}", server_crypto(&forged).unwrap_err());
        assert!(e.contains("do not form a usable identity"), "{e}");
        assert!(server_crypto(&real).is_ok());
    }
}
