//! TLS credentials (`tls-creds-x509` objects) and the rustls configurations built from them,
//! for NBD over TLS on both sides (docs/tls.md, rules K1–K12).
//!
//! An object is loaded whole when it is created (K2): every file it needs is read and parsed
//! then, so a missing or malformed file is an error of `--object` / `object-add`, never of a
//! later connection. The configurations are built once and shared by every connection.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use serde_json::Value;

use crate::config::text;

/// Which side of a connection a credentials object serves (K1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `endpoint=server`: `ballot serve --nbd-server ...,tls-creds=ID`.
    Server,
    /// `endpoint=client`: `driver=nbd,...,tls-creds=ID`.
    Client,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::Server => "server",
            Endpoint::Client => "client",
        }
    }
}

/// A loaded `tls-creds-x509` object.
pub struct TlsCreds {
    /// The object's id.
    pub id: String,
    /// The directory its files came from.
    pub dir: PathBuf,
    /// Its endpoint.
    pub endpoint: Endpoint,
    /// `verify-peer` (K3, K4).
    pub verify_peer: bool,
    server: Option<Arc<ServerConfig>>,
    /// Checks the server's name (K5); used when the client has a host name to check.
    client_named: Option<Arc<ClientConfig>>,
    /// Checks the chain only; for unix sockets without `tls-hostname` (K5).
    client_unnamed: Option<Arc<ClientConfig>>,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsCreds")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("endpoint", &self.endpoint)
            .field("verify_peer", &self.verify_peer)
            .finish()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The file names QEMU expects in a credentials directory (K2).
pub mod files {
    /// The certificate authority that signs the peer's certificate.
    pub const CA_CERT: &str = "ca-cert.pem";
    /// The server's certificate (chain).
    pub const SERVER_CERT: &str = "server-cert.pem";
    /// The server's private key.
    pub const SERVER_KEY: &str = "server-key.pem";
    /// The client's certificate (chain), optional.
    pub const CLIENT_CERT: &str = "client-cert.pem";
    /// The client's private key, optional with the certificate.
    pub const CLIENT_KEY: &str = "client-key.pem";
}

/// One PEM file's bytes and the name it is reported by.
struct Pem<'a> {
    name: String,
    bytes: &'a [u8],
}

fn read(id: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| {
        format!(
            "tls-creds-x509 '{id}': cannot read '{}': {e}",
            path.display()
        )
    })
}

fn load_certs(id: &str, pem: &Pem<'_>) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.bytes)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "tls-creds-x509 '{id}': '{}' is not a PEM certificate file: {e}",
                pem.name
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "tls-creds-x509 '{id}': '{}' holds no certificate",
            pem.name
        ));
    }
    Ok(certs)
}

fn load_key(id: &str, pem: &Pem<'_>) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.bytes).map_err(|e| {
        format!(
            "tls-creds-x509 '{id}': '{}' holds no usable private key (PKCS#8, PKCS#1 or SEC1 PEM; \
             encrypted keys are not supported): {e}",
            pem.name
        )
    })
}

fn load_roots(id: &str, pem: &Pem<'_>) -> Result<Arc<RootCertStore>, String> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(id, pem)? {
        roots.add(c).map_err(|e| {
            format!(
                "tls-creds-x509 '{id}': '{}' holds a certificate that cannot be a trust anchor: {e}",
                pem.name
            )
        })?;
    }
    Ok(Arc::new(roots))
}

/// The PEM texts a credentials object is built from (K2): the CA's certificates (needed to
/// verify the peer), and this side's certificate chain and key (a server's are required, a
/// client's optional).
#[derive(Debug, Clone, Copy)]
pub struct PemSet<'a> {
    /// ca-cert.pem.
    pub ca: Option<&'a [u8]>,
    /// server-cert.pem or client-cert.pem.
    pub cert: Option<&'a [u8]>,
    /// server-key.pem or client-key.pem.
    pub key: Option<&'a [u8]>,
}

/// K2: the certificate and key must belong together; found now rather than at the first
/// handshake, where the peer would only see a failed signature.
fn check_pair(
    id: &str,
    certs: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    cert_name: &str,
) -> Result<(), String> {
    let signer = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| {
            format!("tls-creds-x509 '{id}': the private key for '{cert_name}' cannot be used: {e}")
        })?;
    let ck = rustls::sign::CertifiedKey::new(certs.to_vec(), signer);
    ck.keys_match().map_err(|_| {
        format!("tls-creds-x509 '{id}': the private key does not match the certificate in '{cert_name}'")
    })
}

impl TlsCreds {
    /// Loads a `tls-creds-x509` object from `dir` and QEMU's file names in it (K1, K2).
    ///
    /// # Errors
    /// A message naming the object and the file or parameter at fault.
    pub fn load_x509(
        id: &str,
        dir: &Path,
        endpoint: Endpoint,
        verify_peer: bool,
    ) -> Result<TlsCreds, String> {
        if !dir.is_dir() {
            return Err(format!(
                "tls-creds-x509 '{id}': dir '{}' is not a directory",
                dir.display()
            ));
        }
        let (cert_file, key_file) = match endpoint {
            Endpoint::Server => (files::SERVER_CERT, files::SERVER_KEY),
            Endpoint::Client => (files::CLIENT_CERT, files::CLIENT_KEY),
        };
        let (cert_path, key_path) = (dir.join(cert_file), dir.join(key_file));
        let ca_path = dir.join(files::CA_CERT);
        // K4: a client's certificate is optional: shown when both files exist.
        let pair = match (endpoint, cert_path.exists(), key_path.exists()) {
            (Endpoint::Client, false, false) => None,
            (Endpoint::Client, true, false) | (Endpoint::Client, false, true) => {
                let (there, missing) = if cert_path.exists() {
                    (&cert_path, &key_path)
                } else {
                    (&key_path, &cert_path)
                };
                return Err(format!(
                    "tls-creds-x509 '{id}': '{}' exists but '{}' does not",
                    there.display(),
                    missing.display()
                ));
            }
            _ => Some((read(id, &cert_path)?, read(id, &key_path)?)),
        };
        let ca = if verify_peer {
            Some(read(id, &ca_path)?)
        } else {
            None
        };
        let names = [
            ca_path.display().to_string(),
            cert_path.display().to_string(),
            key_path.display().to_string(),
        ];
        let mut c = TlsCreds::build(
            id,
            endpoint,
            verify_peer,
            PemSet {
                ca: ca.as_deref(),
                cert: pair.as_ref().map(|(c, _)| c.as_slice()),
                key: pair.as_ref().map(|(_, k)| k.as_slice()),
            },
            &names,
        )?;
        c.dir = dir.to_path_buf();
        Ok(c)
    }

    /// Builds credentials from PEM texts held in memory (the simulator's, K11).
    ///
    /// # Errors
    /// A message naming the object and the PEM at fault.
    pub fn from_pem(
        id: &str,
        endpoint: Endpoint,
        verify_peer: bool,
        pem: PemSet<'_>,
    ) -> Result<TlsCreds, String> {
        let (cert, key) = match endpoint {
            Endpoint::Server => (files::SERVER_CERT, files::SERVER_KEY),
            Endpoint::Client => (files::CLIENT_CERT, files::CLIENT_KEY),
        };
        let names = [
            files::CA_CERT.to_string(),
            cert.to_string(),
            key.to_string(),
        ];
        TlsCreds::build(id, endpoint, verify_peer, pem, &names)
    }

    fn build(
        id: &str,
        endpoint: Endpoint,
        verify_peer: bool,
        pem: PemSet<'_>,
        names: &[String; 3],
    ) -> Result<TlsCreds, String> {
        let [ca_name, cert_name, key_name] = names;
        let missing = |what: &str| format!("tls-creds-x509 '{id}': '{what}' is missing");
        let roots = |pem_ca: Option<&[u8]>| -> Result<Arc<RootCertStore>, String> {
            let bytes = pem_ca.ok_or_else(|| missing(ca_name))?;
            load_roots(
                id,
                &Pem {
                    name: ca_name.clone(),
                    bytes,
                },
            )
        };
        let pair = match (pem.cert, pem.key) {
            (Some(c), Some(k)) => {
                let certs = load_certs(
                    id,
                    &Pem {
                        name: cert_name.clone(),
                        bytes: c,
                    },
                )?;
                let key = load_key(
                    id,
                    &Pem {
                        name: key_name.clone(),
                        bytes: k,
                    },
                )?;
                check_pair(id, &certs, &key, cert_name)?;
                Some((certs, key))
            }
            (None, None) if endpoint == Endpoint::Client => None,
            (None, _) => return Err(missing(cert_name)),
            (_, None) => return Err(missing(key_name)),
        };
        let mut creds = TlsCreds {
            id: id.to_string(),
            dir: PathBuf::new(),
            endpoint,
            verify_peer,
            server: None,
            client_named: None,
            client_unnamed: None,
        };
        let versions = rustls::DEFAULT_VERSIONS;
        match endpoint {
            Endpoint::Server => {
                let Some((certs, key)) = pair else {
                    return Err(missing(cert_name));
                };
                let builder = ServerConfig::builder_with_provider(provider())
                    .with_protocol_versions(versions)
                    .map_err(|e| format!("tls-creds-x509 '{id}': {e}"))?;
                // K3: with verify-peer (the default) every client must show a certificate
                // signed by ca-cert.pem.
                let builder = if verify_peer {
                    let v = WebPkiClientVerifier::builder_with_provider(roots(pem.ca)?, provider())
                        .build()
                        .map_err(|e| format!("tls-creds-x509 '{id}': {e}"))?;
                    builder.with_client_cert_verifier(v)
                } else {
                    builder.with_no_client_auth()
                };
                let cfg = builder
                    .with_single_cert(certs, key)
                    .map_err(|e| format!("tls-creds-x509 '{id}': {e}"))?;
                creds.server = Some(Arc::new(cfg));
            }
            Endpoint::Client => {
                let (named, unnamed): (Arc<dyn ServerCertVerifier>, Arc<dyn ServerCertVerifier>) =
                    if verify_peer {
                        let roots = roots(pem.ca)?;
                        let named =
                            WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                                .build()
                                .map_err(|e| format!("tls-creds-x509 '{id}': {e}"))?;
                        let unnamed = Arc::new(Unnamed {
                            roots: Some(roots),
                            algs: provider().signature_verification_algorithms,
                        });
                        (named, unnamed)
                    } else {
                        let any = Arc::new(Unnamed {
                            roots: None,
                            algs: provider().signature_verification_algorithms,
                        });
                        (any.clone(), any)
                    };
                let build = |v: Arc<dyn ServerCertVerifier>| -> Result<Arc<ClientConfig>, String> {
                    let b = ClientConfig::builder_with_provider(provider())
                        .with_protocol_versions(versions)
                        .map_err(|e| format!("tls-creds-x509 '{id}': {e}"))?
                        .dangerous()
                        .with_custom_certificate_verifier(v);
                    let cfg = match &pair {
                        Some((certs, key)) => b
                            .with_client_auth_cert(certs.clone(), key.clone_key())
                            .map_err(|e| format!("tls-creds-x509 '{id}': {e}"))?,
                        None => b.with_no_client_auth(),
                    };
                    Ok(Arc::new(cfg))
                };
                creds.client_named = Some(build(named)?);
                creds.client_unnamed = Some(build(unnamed)?);
            }
        }
        Ok(creds)
    }

    /// The acceptor for a server (K6).
    ///
    /// # Errors
    /// The object is a client's.
    pub fn acceptor(&self) -> Result<tokio_rustls::TlsAcceptor, String> {
        match &self.server {
            Some(cfg) => Ok(tokio_rustls::TlsAcceptor::from(cfg.clone())),
            None => Err(format!(
                "TLS credentials '{}' have endpoint=client; an NBD server needs endpoint=server",
                self.id
            )),
        }
    }

    /// The connector for a client, and the name it checks the server's certificate against
    /// (K5): `tls-hostname`, else the host of a TCP address; none for a unix socket, whose
    /// server is checked against the CA only.
    ///
    /// # Errors
    /// The object is a server's, or the host name is not a valid DNS name or IP address.
    pub fn connector(
        &self,
        hostname: Option<&str>,
    ) -> Result<(tokio_rustls::TlsConnector, ServerName<'static>), String> {
        let (Some(named), Some(unnamed)) = (&self.client_named, &self.client_unnamed) else {
            return Err(format!(
                "TLS credentials '{}' have endpoint=server; an nbd node needs endpoint=client",
                self.id
            ));
        };
        match hostname {
            Some(h) => {
                let name = ServerName::try_from(h.to_string())
                    .map_err(|_| format!("'{h}' is not a valid TLS host name"))?;
                Ok((tokio_rustls::TlsConnector::from(named.clone()), name))
            }
            None => Ok((
                tokio_rustls::TlsConnector::from(unnamed.clone()),
                ServerName::try_from("localhost").map_err(|e| e.to_string())?,
            )),
        }
    }
}

/// A server certificate checked without a name (K5: a unix socket without `tls-hostname`,
/// as QEMU's libnbd peers do) against the CA in `roots`, or not checked at all when `roots` is
/// `None` (K4: `verify-peer=off`; the traffic is still encrypted and the handshake's
/// signatures are still checked).
#[derive(Debug)]
struct Unnamed {
    roots: Option<Arc<RootCertStore>>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Unnamed {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algs.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// A user-created object (`--object`, QMP `object-add`).
#[derive(Debug, Clone)]
pub enum Object {
    /// `tls-creds-x509`.
    TlsCreds(Arc<TlsCreds>),
}

/// The objects of one process, by id (K1).
#[derive(Debug, Clone, Default)]
pub struct Objects {
    map: Arc<Mutex<BTreeMap<String, Object>>>,
}

fn flag(m: &serde_json::Map<String, Value>, key: &str, default: bool) -> Result<bool, String> {
    match text(m, key)?.as_deref() {
        None => Ok(default),
        Some("on" | "true" | "yes") => Ok(true),
        Some("off" | "false" | "no") => Ok(false),
        Some(v) => Err(format!(
            "Parameter '{key}' expects 'on' or 'off', got '{v}'"
        )),
    }
}

impl Objects {
    /// An empty set.
    pub fn new() -> Objects {
        Objects::default()
    }

    /// `--object TYPE,id=ID,...` (keyval) or its JSON form `{"qom-type": ..., "id": ...}`.
    ///
    /// # Errors
    /// A message naming the bad parameter, file or duplicate id.
    pub fn add_arg(&self, arg: &str) -> Result<(), String> {
        let (qom_type, props) = if arg.trim_start().starts_with('{') {
            let v: Value = serde_json::from_str(arg).map_err(|e| format!("JSON: {e}"))?;
            let Value::Object(mut m) = v else {
                return Err("--object: expected a JSON object".into());
            };
            let t = match m.remove("qom-type") {
                Some(Value::String(t)) => t,
                _ => return Err("Parameter 'qom-type' is missing".into()),
            };
            (t, m)
        } else {
            let (t, rest) = arg.split_once(',').unwrap_or((arg, ""));
            let t = t.strip_prefix("qom-type=").unwrap_or(t).to_string();
            let m = if rest.is_empty() {
                serde_json::Map::new()
            } else {
                match crate::config::keyval::parse(rest).map_err(|e| e.to_string())? {
                    Value::Object(m) => m,
                    _ => return Err("--object: expected key=value pairs".into()),
                }
            };
            (t, m)
        };
        self.add(&qom_type, &props)
    }

    /// QMP `object-add`: `qom-type`, `id` and the type's properties.
    ///
    /// # Errors
    /// A message naming the bad parameter, file or duplicate id.
    pub fn add(
        &self,
        qom_type: &str,
        props: &serde_json::Map<String, Value>,
    ) -> Result<(), String> {
        let id = text(props, "id")?.ok_or("Parameter 'id' is missing")?;
        if id.is_empty() || !id.starts_with(|c: char| c.is_ascii_alphabetic()) {
            return Err(format!("Parameter 'id' expects an identifier, got '{id}'"));
        }
        if self.lock().contains_key(&id) {
            return Err(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            ));
        }
        let obj = match qom_type {
            "tls-creds-x509" => {
                let known = ["id", "dir", "endpoint", "verify-peer"];
                if let Some(k) = props.keys().find(|k| !known.contains(&k.as_str())) {
                    return Err(match k.as_str() {
                        "sanity-check" | "passwordid" | "priority" | "loaded" => format!(
                            "tls-creds-x509 '{id}': property '{k}' is not supported by ballot"
                        ),
                        _ => format!("Property '{qom_type}.{k}' not found"),
                    });
                }
                let dir = text(props, "dir")?
                    .ok_or_else(|| format!("tls-creds-x509 '{id}': Parameter 'dir' is missing"))?;
                let endpoint = match text(props, "endpoint")?.as_deref() {
                    None | Some("client") => Endpoint::Client,
                    Some("server") => Endpoint::Server,
                    Some(e) => {
                        return Err(format!(
                            "Parameter 'endpoint' does not accept value '{e}' (client or server)"
                        ))
                    }
                };
                let verify = flag(props, "verify-peer", true)?;
                Object::TlsCreds(Arc::new(TlsCreds::load_x509(
                    &id,
                    Path::new(&dir),
                    endpoint,
                    verify,
                )?))
            }
            // K12: PSK needs external pre-shared keys, which rustls does not implement.
            "tls-creds-psk" => {
                return Err(format!(
                    "tls-creds-psk '{id}': TLS pre-shared keys are not supported: ballot's TLS \
                     stack (rustls) has no external PSK; use tls-creds-x509"
                ))
            }
            "tls-creds-anon" => {
                return Err(format!(
                    "tls-creds-anon '{id}': anonymous TLS is not supported (it authenticates \
                     no one); use tls-creds-x509"
                ))
            }
            other => return Err(format!("invalid object type: {other}")),
        };
        self.lock().insert(id, obj);
        Ok(())
    }

    /// QMP `object-del` (K1): refused while a server or node uses the object.
    ///
    /// # Errors
    /// No such object, or it is in use.
    pub fn del(&self, id: &str) -> Result<(), String> {
        let mut m = self.lock();
        let Some(obj) = m.get(id) else {
            return Err(format!("object '{id}' not found"));
        };
        let Object::TlsCreds(c) = obj;
        if Arc::strong_count(c) > 1 {
            return Err(format!("object '{id}' is in use and cannot be deleted"));
        }
        m.remove(id);
        Ok(())
    }

    /// The TLS credentials `id` for the given endpoint (K1).
    ///
    /// # Errors
    /// No such object, or it is for the other endpoint.
    pub fn tls(&self, id: &str, endpoint: Endpoint) -> Result<Arc<TlsCreds>, String> {
        let m = self.lock();
        let Some(Object::TlsCreds(c)) = m.get(id) else {
            return Err(format!("No TLS credentials with id '{id}'"));
        };
        if c.endpoint != endpoint {
            return Err(format!(
                "Expecting TLS credentials with a {} endpoint: '{id}' has endpoint={}",
                endpoint.name(),
                c.endpoint.name()
            ));
        }
        Ok(c.clone())
    }

    /// The ids, in order.
    pub fn ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Object>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A TLS failure in words a user acts on (K9): what failed and why, from rustls's error.
pub fn describe(e: &std::io::Error) -> String {
    let inner = e.get_ref().and_then(|x| x.downcast_ref::<rustls::Error>());
    match inner {
        Some(r) => r.to_string(),
        None => e.to_string(),
    }
}
