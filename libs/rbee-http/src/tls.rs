//! TLS for the daemons' server loop and CA files for their clients: a certificate chain and key
//! from PEM files, swapped in place on reload (a renewed certificate needs no restart).

use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// The `[tls]` section of the queen's and the hive's configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain this daemon serves (empty: plain HTTP). Re-read on SIGHUP.
    pub cert_file: String,
    /// PEM private key of that certificate (mode 0600). Re-read on SIGHUP.
    pub key_file: String,
    /// PEM CA certificates trusted, besides the system's, when this daemon calls the other one
    /// over `https://` (the queen its hives, a hive its queen). Read at start.
    pub ca_file: String,
    /// PEM CA whose client certificates this daemon verifies (the queen: hives' heartbeats
    /// must present one; the hive: every caller must). Empty: none asked for. Needs TLS.
    pub client_ca_file: String,
    /// PEM certificate (and `client_key_file`, its key, 0600) this daemon presents when it
    /// calls the other one over `https://`.
    pub client_cert_file: String,
    pub client_key_file: String,
}

impl TlsConfig {
    /// Whether this daemon serves TLS.
    pub fn serves(&self) -> bool {
        !self.cert_file.is_empty()
    }

    /// Field errors: both files of a pair or neither; a client CA only with TLS.
    pub fn problems(&self) -> Vec<(&'static str, &'static str)> {
        let mut out = Vec::new();
        match (self.cert_file.is_empty(), self.key_file.is_empty()) {
            (true, false) => out.push(("tls.cert_file", "is required with tls.key_file")),
            (false, true) => out.push(("tls.key_file", "is required with tls.cert_file")),
            _ => {}
        }
        match (
            self.client_cert_file.is_empty(),
            self.client_key_file.is_empty(),
        ) {
            (true, false) => out.push((
                "tls.client_cert_file",
                "is required with tls.client_key_file",
            )),
            (false, true) => out.push((
                "tls.client_key_file",
                "is required with tls.client_cert_file",
            )),
            _ => {}
        }
        if !self.client_ca_file.is_empty() && self.cert_file.is_empty() {
            out.push((
                "tls.client_ca_file",
                "needs tls.cert_file (client certificates come over TLS)",
            ));
        }
        out
    }

    /// The client identity (certificate and key in one PEM) this daemon presents, if any.
    pub fn client_identity_pem(&self) -> Result<Option<Vec<u8>>, TlsError> {
        if self.client_cert_file.is_empty() {
            return Ok(None);
        }
        let key = Path::new(&self.client_key_file);
        check_key_mode(key)?;
        let mut pem = read(Path::new(&self.client_cert_file))?;
        pem.push(b'\n');
        pem.extend(read(key)?);
        Ok(Some(pem))
    }
}

/// Why TLS material could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no PEM certificate in it", .0.display())]
    NoCertificate(PathBuf),
    #[error("{}: no PEM private key in it ({reason})", path.display())]
    NoKey { path: PathBuf, reason: String },
    #[error("{}: the key file may be read by others (mode {mode:o}); chmod 600 it", path.display())]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("{}: not a usable client CA: {reason}", path.display())]
    ClientCa { path: PathBuf, reason: String },
    #[error("the certificate and key do not make a TLS server: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Whether a connection's client presented a certificate the daemon's `client_ca_file` signed
/// (a request extension set by the server loop on TLS connections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientCertificate(pub bool);

/// Who must present a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// Every connection (the handshake fails without one).
    Required,
    /// Those that have one present it; the daemon checks [`ClientCertificate`] where needed.
    Optional,
}

/// A daemon's TLS server side: the current certificate, swapped by [`ServerTls::reload`].
#[derive(Clone)]
pub struct ServerTls {
    cert_file: PathBuf,
    key_file: PathBuf,
    client_ca: Option<(PathBuf, ClientAuth)>,
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

impl ServerTls {
    /// Loads the certificate chain and key named by `cfg` (which must serve TLS), and its
    /// `client_ca_file` with `auth` when set.
    pub fn load(cfg: &TlsConfig, auth: ClientAuth) -> Result<ServerTls, TlsError> {
        let cert_file = PathBuf::from(&cfg.cert_file);
        let key_file = PathBuf::from(&cfg.key_file);
        let client_ca =
            (!cfg.client_ca_file.is_empty()).then(|| (PathBuf::from(&cfg.client_ca_file), auth));
        let config = server_config(&cert_file, &key_file, client_ca.as_ref())?;
        Ok(ServerTls {
            cert_file,
            key_file,
            client_ca,
            current: Arc::new(RwLock::new(Arc::new(config))),
        })
    }

    /// Re-reads the files; on failure the running certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.cert_file, &self.key_file, self.client_ca.as_ref())?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(config);
        Ok(())
    }

    /// An acceptor with the current certificate.
    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// The certificates in a PEM file (a chain, or a CA bundle).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

fn check_key_mode(key_file: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(key_file)
        .map_err(|source| TlsError::Read {
            path: key_file.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyMode {
            path: key_file.to_owned(),
            mode: mode & 0o777,
        });
    }
    Ok(())
}

fn server_config(
    cert_file: &Path,
    key_file: &Path,
    client_ca: Option<&(PathBuf, ClientAuth)>,
) -> Result<rustls::ServerConfig, TlsError> {
    let certs = certificates(cert_file)?;
    check_key_mode(key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&read(key_file)?).map_err(|e| TlsError::NoKey {
        path: key_file.to_owned(),
        reason: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some((ca_file, auth)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(ca_file)? {
                roots.add(c)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            );
            let verifier = match auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier.build().map_err(|e| TlsError::ClientCa {
                path: ca_file.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
