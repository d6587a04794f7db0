//! TLS to the collector, with rustls on ring (no OpenSSL).
//!
//! The files the standard variables name ([`TlsSettings`]) are read and
//! checked once, at start, so that a missing key or a file that is not PEM
//! is said in one line before anything is sent. Then:
//! - gRPC: tonic's own TLS ([`Tls::tonic`]), which the SDK's exporter takes;
//! - HTTP: a hyper client on a rustls connector ([`Tls::http_client`]).
//!
//! Handshake failures come back from the SDK as long strings (gRPC) or as
//! "network error" with the cause dropped (HTTP); [`explain`] turns the
//! cause into one plain sentence, and [`Explained`] keeps the HTTP cause.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig, Identity};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::config::{TlsFile, TlsSettings};

/// A TLS file or setting that cannot be used, in one line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TlsError {
    #[error("{var}: cannot read {path}: {reason}")]
    Read {
        var: String,
        path: String,
        reason: String,
    },
    #[error("{var}: {path} holds no PEM certificate")]
    NoCertificate { var: String, path: String },
    #[error("{var}: {path} holds no PEM private key")]
    NoKey { var: String, path: String },
    #[error("{given} is set but {missing} is not: a client certificate needs its private key, and a key its certificate")]
    Unpaired { given: String, missing: String },
    #[error("{cert} and {key} cannot be used together: {reason}")]
    Identity {
        cert: String,
        key: String,
        reason: String,
    },
}

fn read(f: &TlsFile) -> Result<Vec<u8>, TlsError> {
    std::fs::read(&f.path).map_err(|e| TlsError::Read {
        var: f.var.clone(),
        path: f.path.display().to_string(),
        reason: e.kind().to_string(),
    })
}

fn certificates(f: &TlsFile, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            var: f.var.clone(),
            path: f.path.display().to_string(),
        });
    }
    Ok(certs)
}

/// The name of the variable that would hold the other half of a client
/// identity (`..._CLIENT_CERTIFICATE` <-> `..._CLIENT_KEY`).
fn other_half(var: &str) -> String {
    match var.strip_suffix("CLIENT_CERTIFICATE") {
        Some(prefix) => format!("{prefix}CLIENT_KEY"),
        None => format!(
            "{}CLIENT_CERTIFICATE",
            var.strip_suffix("CLIENT_KEY").unwrap_or(var)
        ),
    }
}

/// The checked TLS material of one connection.
#[derive(Debug, Clone)]
pub struct Tls {
    ca_pem: Option<Vec<u8>>,
    /// Client certificate chain and key, PEM.
    identity: Option<(Vec<u8>, Vec<u8>)>,
    rustls: Arc<rustls::ClientConfig>,
}

impl Tls {
    /// Reads and checks the files of `s`.
    pub fn load(s: &TlsSettings) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let ca_pem = match &s.ca {
            Some(f) => {
                let pem = read(f)?;
                roots.add_parsable_certificates(certificates(f, &pem)?);
                Some(pem)
            }
            None => {
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                None
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots);
        let (config, identity) = match (&s.client_cert, &s.client_key) {
            (None, None) => (builder.with_no_client_auth(), None),
            (Some(c), None) | (None, Some(c)) => {
                return Err(TlsError::Unpaired {
                    given: c.var.clone(),
                    missing: other_half(&c.var),
                })
            }
            (Some(c), Some(k)) => {
                let (cert_pem, key_pem) = (read(c)?, read(k)?);
                let chain = certificates(c, &cert_pem)?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey {
                    var: k.var.clone(),
                    path: k.path.display().to_string(),
                })?;
                let config =
                    builder
                        .with_client_auth_cert(chain, key)
                        .map_err(|e| TlsError::Identity {
                            cert: c.var.clone(),
                            key: k.var.clone(),
                            reason: e.to_string(),
                        })?;
                (config, Some((cert_pem, key_pem)))
            }
        };
        Ok(Tls {
            ca_pem,
            identity,
            rustls: Arc::new(config),
        })
    }

    /// Settings for tonic's TLS (the same files; tonic builds its own
    /// rustls configuration with ALPN h2).
    pub fn tonic(&self) -> ClientTlsConfig {
        let c = ClientTlsConfig::new();
        let c = match &self.ca_pem {
            Some(pem) => c.ca_certificate(Certificate::from_pem(pem)),
            None => c.with_webpki_roots(),
        };
        match &self.identity {
            Some((cert, key)) => c.identity(Identity::from_pem(cert, key)),
            None => c,
        }
    }

    /// An HTTP/1.1 client over this TLS, with `timeout` per request; the
    /// cause of its last failure goes to `last_error`.
    pub fn http_client(&self, timeout: Duration, last_error: LastError) -> impl HttpClient {
        // (The builder sets ALPN to http/1.1 itself.)
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.rustls).clone())
            .https_only()
            .enable_http1()
            .build();
        Explained {
            inner: opentelemetry_http::hyper::HyperClient::new(connector, timeout, None),
            last_error,
        }
    }
}

/// Where an HTTP client leaves the cause of its last failure.
pub type LastError = Arc<Mutex<Option<String>>>;

/// An HTTP client that keeps the cause of its failures (the SDK replaces
/// it with "network error").
#[derive(Debug)]
pub struct Explained<C> {
    pub inner: C,
    pub last_error: LastError,
}

#[async_trait::async_trait]
impl<C: HttpClient> HttpClient for Explained<C> {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let r = self.inner.send_bytes(request).await;
        if let Err(e) = &r {
            let mut chain = e.to_string();
            let mut next = e.source();
            while let Some(cause) = next {
                chain.push_str(": ");
                chain.push_str(&cause.to_string());
                next = cause.source();
            }
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(chain);
        }
        r
    }
}

/// One plain sentence for a TLS failure found in an error's text (rustls'
/// wording), or `None` when the failure is not about TLS.
pub fn explain(text: &str) -> Option<String> {
    let after = |needle: &str| text.find(needle).map(|i| &text[i + needle.len()..]);
    let word = |rest: &str| {
        rest.split(|c: char| !c.is_ascii_alphanumeric())
            .next()
            .unwrap_or("")
            .to_string()
    };
    if let Some(rest) = after("invalid peer certificate: ") {
        // rustls says the common ones in words, the others by their name.
        let cert = "TLS: the collector's certificate";
        return Some(if rest.starts_with("UnknownIssuer") {
            format!("{cert} is not signed by a trusted CA (set OTEL_EXPORTER_OTLP_CERTIFICATE to the CA that signed it)")
        } else if rest.starts_with("certificate expired") || rest.starts_with("Expired") {
            format!("{cert} has expired")
        } else if rest.starts_with("certificate not valid yet") || rest.starts_with("NotValidYet") {
            format!("{cert} is not valid yet (check the clocks)")
        } else if rest.starts_with("certificate not valid for name")
            || rest.starts_with("NotValidForName")
        {
            format!("{cert} does not name the endpoint's host")
        } else if rest.starts_with("certificate does not allow")
            || rest.starts_with("InvalidPurpose")
        {
            format!("{cert} is not meant for a server (extended key usage)")
        } else {
            format!("{cert} is refused ({})", word(rest))
        });
    }
    if let Some(rest) = after("received fatal alert: ") {
        let alert = word(rest);
        return Some(match alert.as_str() {
            "CertificateRequired" | "HandshakeFailure" => format!("TLS: the collector requires a client certificate (OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and OTEL_EXPORTER_OTLP_CLIENT_KEY) (alert {alert})"),
            "UnknownCA" | "BadCertificate" | "CertificateExpired" | "CertificateUnknown" | "DecryptError" => format!("TLS: the collector refused ktrace's client certificate (alert {alert})"),
            _ => format!("TLS: the collector ended the handshake (alert {alert})"),
        });
    }
    if text.contains("InvalidContentType") || text.contains("corrupt message") {
        return Some(
            "TLS: the endpoint does not answer TLS (a plain-text collector? use http://)".into(),
        );
    }
    if text.contains("peer closed connection without sending TLS close_notify")
        || text.contains("tls handshake eof")
    {
        return Some("TLS: the collector closed the connection during the handshake".into());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn file(var: &str, path: &str) -> TlsFile {
        TlsFile {
            var: var.into(),
            path: PathBuf::from(path),
        }
    }

    #[test]
    fn a_client_certificate_needs_its_key() {
        let s = TlsSettings {
            ca: None,
            client_cert: Some(file("OTEL_EXPORTER_OTLP_LOGS_CLIENT_CERTIFICATE", "/x.pem")),
            client_key: None,
        };
        let e = Tls::load(&s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "OTEL_EXPORTER_OTLP_LOGS_CLIENT_CERTIFICATE is set but OTEL_EXPORTER_OTLP_LOGS_CLIENT_KEY is not: a client certificate needs its private key, and a key its certificate"
        );
        let s = TlsSettings {
            client_cert: None,
            client_key: Some(file("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/k.pem")),
            ..s
        };
        assert!(
            matches!(Tls::load(&s), Err(TlsError::Unpaired { missing, .. }) if missing == "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")
        );
    }

    #[test]
    fn unreadable_and_non_pem_files_are_named() {
        let s = TlsSettings {
            ca: Some(file(
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
                "/nonexistent/ca.pem",
            )),
            ..Default::default()
        };
        assert_eq!(
            Tls::load(&s).unwrap_err().to_string(),
            "OTEL_EXPORTER_OTLP_CERTIFICATE: cannot read /nonexistent/ca.pem: entity not found"
        );
        let p = std::env::temp_dir().join(format!("ktrace-tls-{}.pem", std::process::id()));
        std::fs::write(&p, "not a certificate\n").unwrap();
        let s = TlsSettings {
            ca: Some(file("OTEL_EXPORTER_OTLP_CERTIFICATE", p.to_str().unwrap())),
            ..Default::default()
        };
        let e = Tls::load(&s).unwrap_err();
        let _ = std::fs::remove_file(&p);
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        // No files: the built-in roots.
        assert!(Tls::load(&TlsSettings::default()).is_ok());
    }

    #[test]
    fn handshake_failures_in_plain_words() {
        let grpc = "metrics export failed with gRPC code: Unavailable: transport error: invalid peer certificate: UnknownIssuer";
        assert!(explain(grpc)
            .unwrap()
            .contains("not signed by a trusted CA"));
        let expired = "client error (Connect): invalid peer certificate: certificate expired: verification time 1 (UNIX), but certificate is not valid after 0 (1 seconds ago)";
        assert!(explain(expired).unwrap().contains("has expired"));
        let alert = "error trying to connect: received fatal alert: CertificateRequired";
        assert!(explain(alert)
            .unwrap()
            .contains("requires a client certificate"));
        assert_eq!(explain("tcp connect error: Connection refused"), None);
    }
}
