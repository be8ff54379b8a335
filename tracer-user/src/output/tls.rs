//! rustls client configuration for `syslog+tls://` and `https://` (ring backend).
use std::{path::Path, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
};

use super::OutputError;

/// Where the system trust store is on Debian-like systems, used when `--ca` is not given.
const SYSTEM_CA: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub(crate) ca: Option<std::path::PathBuf>,
    pub(crate) client_cert: Option<std::path::PathBuf>,
    pub(crate) client_key: Option<std::path::PathBuf>,
}

pub(crate) fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, OutputError> {
    let ca = files.ca.as_deref().unwrap_or(Path::new(SYSTEM_CA));
    let mut roots = RootCertStore::empty();
    let certs = load_certs(ca, "CA file")?;
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(OutputError::Tls(format!(
            "CA file {}: no usable certificate",
            ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| OutputError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match (&files.client_cert, &files.client_key) {
        (Some(cert), Some(key)) => {
            let chain = load_certs(cert, "client certificate")?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|e| OutputError::Tls(format!("client key {}: {e}", key.display())))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| OutputError::Tls(format!("client certificate/key: {e}")))?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(OutputError::Tls(
                "--client-cert and --client-key go together".to_string(),
            ));
        }
    };
    Ok(Arc::new(config))
}

fn load_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, OutputError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| OutputError::Tls(format!("{what} {}: {e}", path.display())))?
        .collect();
    let certs = certs.map_err(|e| OutputError::Tls(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(OutputError::Tls(format!(
            "{what} {}: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, OutputError> {
    ServerName::try_from(
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
    )
    .map_err(|e| OutputError::Spec(format!("`{host}` is not a TLS server name: {e}")))
}
