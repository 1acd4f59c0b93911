//! TLS settings of this process (mutual TLS with the site's CA).

use super::*;

/// TLS settings of this process: every shoal certificate is issued by the
/// site's CA and names `shoal` (what `shoal certs` makes); both ends of
/// every connection present one (mutual TLS).
pub struct TlsConfig {
    pub(crate) client: Arc<rustls::ClientConfig>,
    pub(crate) server: Arc<rustls::ServerConfig>,
    /// The dashboard's: the same certificate, no client certificate asked
    /// (browsers have none; the dashboard token guards it).
    https: Arc<rustls::ServerConfig>,
    paths: [PathBuf; 3],
}

/// The name every shoal certificate carries and every peer checks.
pub const TLS_NAME: &str = "shoal";

pub(crate) static TLS: std::sync::OnceLock<TlsConfig> = std::sync::OnceLock::new();

pub(crate) fn tls_err(what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("TLS: {what}: {e}"))
}

pub(crate) fn load_tls(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> io::Result<TlsConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &std::path::Path| -> io::Result<Vec<CertificateDer<'static>>> {
        CertificateDer::pem_file_iter(p)
            .map_err(|e| tls_err(&format!("cannot read {}", p.display()), e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls_err(&format!("bad certificate in {}", p.display()), e))
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in read(ca)? {
        roots.add(c).map_err(|e| tls_err("bad CA certificate", e))?;
    }
    let roots = Arc::new(roots);
    let chain = read(cert)?;
    let key_path = key;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| tls_err(&format!("cannot read the key {}", key_path.display()), e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", e))?
        .with_root_certificates(roots.clone())
        .with_client_auth_cert(chain.clone(), key.clone_key())
        .map_err(|e| tls_err("certificate and key", e))?;
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| tls_err("client verifier", e))?;
    let mut https = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", e))?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(|e| tls_err("certificate and key", e))?;
    https.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| tls_err("certificate and key", e))?;
    Ok(TlsConfig {
        client: Arc::new(client),
        server: Arc::new(server),
        https: Arc::new(https),
        paths: [ca.into(), cert.into(), key_path.into()],
    })
}

/// Sets this process's TLS certificates (CA, own certificate, own key; PEM
/// files). Once per process; setting other files later is an error.
pub fn configure_tls(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> io::Result<()> {
    let wanted = [ca.to_path_buf(), cert.to_path_buf(), key.to_path_buf()];
    if let Some(t) = TLS.get() {
        if t.paths == wanted {
            return Ok(());
        }
        return Err(tls_err(
            "already configured",
            format!("this process uses {:?}", t.paths),
        ));
    }
    let cfg = load_tls(ca, cert, key)?;
    let _ = TLS.set(cfg);
    Ok(())
}

/// The dashboard's TLS acceptor (server certificate only), for a process
/// whose cluster uses TLS.
pub fn https_acceptor() -> io::Result<tokio_rustls::TlsAcceptor> {
    Ok(tokio_rustls::TlsAcceptor::from(tls()?.https.clone()))
}

/// The process's TLS settings: from [`configure_tls`], else from
/// `SHOAL_TLS_CA`, `SHOAL_TLS_CERT` and `SHOAL_TLS_KEY`.
pub(crate) fn tls() -> io::Result<&'static TlsConfig> {
    if let Some(t) = TLS.get() {
        return Ok(t);
    }
    let var = |n: &str| crate::settings::raw(n).map(PathBuf::from);
    match (
        var("SHOAL_TLS_CA"),
        var("SHOAL_TLS_CERT"),
        var("SHOAL_TLS_KEY"),
    ) {
        (Some(ca), Some(cert), Some(key)) => {
            configure_tls(&ca, &cert, &key)?;
            Ok(TLS.get().expect("just set"))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a tls:// address needs certificates: --tls-ca/--tls-cert/--tls-key (or \
             SHOAL_TLS_CA, SHOAL_TLS_CERT, SHOAL_TLS_KEY); `shoal certs DIR` makes a set",
        )),
    }
}
