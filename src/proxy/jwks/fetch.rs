//! Fetching a JWKS document over HTTPS, bounded on every side a hostile
//! or broken provider could stretch: the whole fetch has a deadline, the
//! body at most [`MAX_JWKS_BYTES`], at most [`MAX_REDIRECTS`] redirects
//! and only to `https://`. The server is verified against the platform's
//! roots plus an optional extra bundle, by name, with rustls.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

pub const MAX_JWKS_BYTES: usize = 1024 * 1024;
pub const MAX_REDIRECTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0:?} is not an https:// URL")]
    NotHttps(String),
    #[error("cannot resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("cannot connect to {host}: {source}")]
    Connect {
        host: String,
        source: std::io::Error,
    },
    #[error("TLS with {host}: {source}")]
    Tls {
        host: String,
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
    #[error("the document is over {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Fetches documents from HTTPS URLs.
#[derive(Clone)]
pub struct Fetcher {
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl Fetcher {
    /// `roots`: the platform's, plus any extra CA the operator gave.
    pub fn new(roots: RootCertStore, timeout: Duration) -> Result<Self, rustls::Error> {
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(crate::crypto::provider()))
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
        Ok(Self {
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            timeout,
        })
    }

    /// The document at `url`, following up to [`MAX_REDIRECTS`] redirects.
    pub async fn fetch(&self, url: &str) -> Result<Bytes, FetchError> {
        tokio::time::timeout(self.timeout, self.follow(url))
            .await
            .map_err(|_| FetchError::Timeout(self.timeout))?
    }

    async fn follow(&self, url: &str) -> Result<Bytes, FetchError> {
        let mut uri = https_uri(url)?;
        for _ in 0..=MAX_REDIRECTS {
            match self.get(&uri).await? {
                Answer::Body(body) => return Ok(body),
                Answer::Redirect(location) => uri = resolve(&uri, &location)?,
            }
        }
        Err(FetchError::TooManyRedirects)
    }

    async fn get(&self, uri: &Uri) -> Result<Answer, FetchError> {
        let host = uri.host().unwrap_or_default().to_string();
        let port = uri.port_u16().unwrap_or(443);
        // Brackets of an IPv6 literal are the URI's, not the address's.
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let addrs: Vec<_> = tokio::net::lookup_host((bare.as_str(), port))
            .await
            .map_err(|source| FetchError::Resolve {
                host: host.clone(),
                source,
            })?
            .collect();
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        let mut connected = None;
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    connected = Some(stream);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let stream = connected.ok_or_else(|| FetchError::Connect {
            host: host.clone(),
            source: last,
        })?;
        let _ = stream.set_nodelay(true);
        let name = ServerName::try_from(bare.clone()).map_err(|e| FetchError::Tls {
            host: host.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
        })?;
        let tls = self
            .tls
            .connect(name, stream)
            .await
            .map_err(|source| FetchError::Tls {
                host: host.clone(),
                source,
            })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
        let driver = tokio::spawn(connection);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = uri.authority().map_or(host.as_str(), |a| a.as_str());
        let request = Request::get(path)
            .header(header::HOST, authority)
            .header(header::ACCEPT, "application/json, application/jwk-set+json")
            .header(header::USER_AGENT, "outrider")
            .body(Empty::<Bytes>::new())
            .map_err(|_| FetchError::NotHttps(uri.to_string()))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let answer = if status.is_redirection() {
            match response
                .headers()
                .get(header::LOCATION)
                .and_then(|l| l.to_str().ok())
            {
                Some(location) => Answer::Redirect(location.to_string()),
                None => return Err(FetchError::Status(status)),
            }
        } else if status == StatusCode::OK {
            let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
                .collect()
                .await
                .map_err(|e| match e.downcast::<hyper::Error>() {
                    Ok(e) => FetchError::Http(*e),
                    Err(_) => FetchError::TooLarge,
                })?;
            Answer::Body(body.to_bytes())
        } else {
            return Err(FetchError::Status(status));
        };
        driver.abort();
        Ok(answer)
    }
}

enum Answer {
    Body(Bytes),
    Redirect(String),
}

fn https_uri(url: &str) -> Result<Uri, FetchError> {
    let uri: Uri = url
        .parse()
        .map_err(|_| FetchError::NotHttps(url.to_string()))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
        return Err(FetchError::NotHttps(url.to_string()));
    }
    Ok(uri)
}

/// A redirect's target: absolute (and then `https://` only) or a path on
/// the same server.
fn resolve(base: &Uri, location: &str) -> Result<Uri, FetchError> {
    if location.starts_with('/') && !location.starts_with("//") {
        let authority = base.authority().map_or("", |a| a.as_str());
        return https_uri(&format!("https://{authority}{location}"));
    }
    https_uri(location)
}

/// The roots a fetch trusts: the platform's (`SSL_CERT_FILE`,
/// `SSL_CERT_DIR` or the system store) and `extra`. Platform roots that
/// do not load are skipped (a store without them still trusts `extra`).
pub fn roots(extra: &[CertificateDer<'static>]) -> RootCertStore {
    let mut store = RootCertStore::empty();
    let platform = rustls_native_certs::load_native_certs();
    let (_added, _ignored) = store.add_parsable_certificates(platform.certs);
    let (_added, _ignored) = store.add_parsable_certificates(extra.iter().cloned());
    store
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls_and_same_server_paths_are_followed() {
        assert!(matches!(
            https_uri("http://idp.example/keys"),
            Err(FetchError::NotHttps(_))
        ));
        assert!(https_uri("https://idp.example/keys").is_ok());
        let base = https_uri("https://idp.example:8443/a").unwrap();
        assert_eq!(
            resolve(&base, "/b?c").unwrap().to_string(),
            "https://idp.example:8443/b?c"
        );
        assert!(resolve(&base, "http://evil.example/").is_err());
        assert!(resolve(&base, "//evil.example/x").is_err());
        assert_eq!(
            resolve(&base, "https://other.example/k").unwrap().host(),
            Some("other.example")
        );
    }
}
