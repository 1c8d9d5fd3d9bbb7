//! TLS on the router's client-facing listeners (`[router.tls]`), end to end:
//! the official `openai` Python client over https and a tonic client, mutual
//! TLS refusing clients without a certificate, and a certificate rotated
//! under load: the new certificate is served within seconds while a stream
//! that started before the rotation runs to its last token.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_cluster::config::ClientTlsSection;
use tandem_kv_transfer::ClusterCa;
use tandem_proto::v1 as pb;
use tandem_tests::*;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A CA, and the router's certificate for localhost / 127.0.0.1 signed by it.
struct Pki {
    dir: tempfile::TempDir,
    ca: ClusterCa,
    ca_pem: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("client-facing test CA").unwrap();
        let router = write_certs(dir.path(), &ca, "router", &["localhost", "127.0.0.1"]);
        Pki {
            ca_pem: router.ca,
            cert: router.cert,
            key: router.key,
            ca,
            dir,
        }
    }

    /// A client certificate signed by the CA: (cert, key) paths.
    fn client_cert(&self) -> (PathBuf, PathBuf) {
        let c = write_certs(self.dir.path(), &self.ca, "client", &["client.test"]);
        (c.cert, c.key)
    }

    fn section(&self, client_ca: bool) -> ClientTlsSection {
        ClientTlsSection {
            cert: self.cert.clone(),
            key: self.key.clone(),
            client_ca: client_ca.then(|| self.ca_pem.clone()),
        }
    }
}

async fn tls_cluster(model: Arc<tandem_engine::ModelDir>, tls: ClientTlsSection) -> Cluster {
    let mut spec = ClusterSpec::default();
    spec.router.http_listen = Some("127.0.0.1:0".parse().unwrap());
    spec.router.client_tls = Some(tls);
    Cluster::start(model, spec).await
}

/// A tonic client of the router over TLS, trusting `ca`, presenting
/// `identity` if given.
async fn tls_client(
    addr: std::net::SocketAddr,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<pb::generate_client::GenerateClient<Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let channel = Endpoint::from_shared(format!("https://localhost:{}", addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(pb::generate_client::GenerateClient::new(channel))
}

/// Runs tests/e2e/openai_tls_client.py against `base` trusting `ca`;
/// returns what it printed.
async fn openai_client(
    base: String,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> serde_json::Value {
    let mut args = vec![base, ca.display().to_string()];
    if let Some((cert, key)) = identity {
        args.push(cert.display().to_string());
        args.push(key.display().to_string());
    }
    run_client_script("openai_tls_client.py", args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_client_listeners_serve_tls_to_the_openai_client_and_tonic() {
    let (_dir, model) = small_model();
    let pki = Pki::new();
    let cluster = tls_cluster(model.clone(), pki.section(false)).await;
    let http = cluster.http.expect("the router serves HTTP");

    // The official openai client over https, trusting the CA.
    let prompt = model.tokenizer.encode("Once upon a time", true).unwrap();
    let expected = generated_text(&model, &reference(&model, &prompt, 8));
    let seen = openai_client(
        format!("https://localhost:{}/v1", http.port()),
        &pki.ca_pem,
        None,
    )
    .await;
    assert_eq!(seen["error"], serde_json::Value::Null, "{seen}");
    assert_eq!(seen["models"][0], model.name());
    assert_eq!(seen["completion"], expected.as_str());
    assert_eq!(seen["completion_stream"], expected.as_str());

    // tonic over TLS: the same tokens as the engine's own greedy decoding.
    let mut client = tls_client(cluster.router, &pki.ca_pem, None).await.unwrap();
    let p = prompt_tokens(40, 3);
    let got = complete(&mut client, greedy_request(&p, 12)).await.unwrap();
    assert_eq!(got.tokens, reference(&model, &p, 12));

    // Plaintext to a TLS listener gets nowhere, on either API.
    let mut plain =
        pb::generate_client::GenerateClient::connect(format!("http://{}", cluster.router))
            .await
            .unwrap();
    assert!(complete(&mut plain, greedy_request(&p, 2)).await.is_err());
    let seen = openai_client(format!("http://{http}/v1"), &pki.ca_pem, None).await;
    assert_eq!(seen["error"], "connection", "{seen}");
    // A client that does not trust the CA refuses the router.
    let other = Pki::new();
    assert!(
        tls_client(cluster.router, &other.ca_pem, None)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_certificates_are_required_when_client_ca_is_set() {
    let (_dir, model) = small_model();
    let pki = Pki::new();
    let cluster = tls_cluster(model.clone(), pki.section(true)).await;
    let http = cluster.http.expect("the router serves HTTP");
    let (cert, key) = pki.client_cert();
    let p = prompt_tokens(20, 9);

    // Without a client certificate: refused on both listeners.
    let refused = match tls_client(cluster.router, &pki.ca_pem, None).await {
        Err(_) => true,
        // TLS 1.3: the server checks the certificate after the client
        // considers the handshake done, so the refusal may come with the call.
        Ok(mut c) => complete(&mut c, greedy_request(&p, 2)).await.is_err(),
    };
    assert!(refused, "a gRPC client without a certificate was served");
    let base = format!("https://localhost:{}/v1", http.port());
    let seen = openai_client(base.clone(), &pki.ca_pem, None).await;
    assert_eq!(seen["error"], "connection", "{seen}");
    // A certificate from another CA is refused too.
    let stranger = Pki::new();
    let (s_cert, s_key) = stranger.client_cert();
    let refused = match tls_client(cluster.router, &pki.ca_pem, Some((&s_cert, &s_key))).await {
        Err(_) => true,
        Ok(mut c) => complete(&mut c, greedy_request(&p, 2)).await.is_err(),
    };
    assert!(refused, "a certificate from another CA was accepted");

    // With one: served.
    let mut client = tls_client(cluster.router, &pki.ca_pem, Some((&cert, &key)))
        .await
        .unwrap();
    let got = complete(&mut client, greedy_request(&p, 6)).await.unwrap();
    assert_eq!(got.tokens, reference(&model, &p, 6));
    let seen = openai_client(base, &pki.ca_pem, Some((&cert, &key))).await;
    assert_eq!(seen["error"], serde_json::Value::Null, "{seen}");
    assert_eq!(seen["models"][0], model.name());
}

/// The leaf certificate (DER) the listener at `addr` presents to a new
/// TLS connection now, offering the ALPN protocol `alpn`.
async fn served_cert(addr: std::net::SocketAddr, ca: &Path, alpn: &[u8]) -> Vec<u8> {
    served_cert_to(addr, ca, alpn, None).await
}

/// [`served_cert`], presenting the client certificate `identity`.
async fn served_cert_to(
    addr: std::net::SocketAddr,
    ca: &Path,
    alpn: &[u8],
    identity: Option<(&Path, &Path)>,
) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let mut config = match identity {
        None => config.with_no_client_auth(),
        Some((cert, key)) => config
            .with_client_auth_cert(
                rustls::pki_types::CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .map(Result::unwrap)
                    .collect(),
                rustls::pki_types::PrivateKeyDer::from_pem_file(key).unwrap(),
            )
            .unwrap(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &Path) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_file(pem)
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_certificate_is_served_within_seconds_and_no_stream_is_dropped() {
    let (_dir, model) = small_model();
    let pki = Pki::new();
    let cluster = tls_cluster(model.clone(), pki.section(false)).await;
    let old = der_of(&pki.cert);
    assert_eq!(served_cert(cluster.router, &pki.ca_pem, b"h2").await, old);

    // A long stream, started before the rotation, read as it comes.
    let mut client = tls_client(cluster.router, &pki.ca_pem, None).await.unwrap();
    let long_prompt = prompt_tokens(24, 1);
    let long_len = 960;
    let mut long = client
        .generate(greedy_request(&long_prompt, long_len))
        .await
        .unwrap()
        .into_inner();
    let long = tokio::spawn(async move {
        let (mut tokens, mut finished, mut last_at) = (Vec::new(), None, None);
        while let Some(msg) = long
            .message()
            .await
            .expect("the long stream survives the rotation")
        {
            match msg.event {
                Some(pb::generate_response::Event::Token(t)) => {
                    tokens.extend(t.ids);
                    last_at = Some(Instant::now());
                }
                Some(pb::generate_response::Event::Finished(f)) => finished = Some(f.reason),
                Some(pb::generate_response::Event::PromptLogprobs(_)) | None => {}
            }
        }
        (tokens, finished, last_at)
    });

    // Load: requests on their own connections all through the rotation.
    let load_stop = tokio_util::sync::CancellationToken::new();
    let mut load = Vec::new();
    for i in 0..4u32 {
        let (addr, ca, stop, model) = (
            cluster.router,
            pki.ca_pem.clone(),
            load_stop.clone(),
            model.clone(),
        );
        load.push(tokio::spawn(async move {
            let mut done = 0;
            while !stop.is_cancelled() {
                // A fresh connection each time: handshakes across the rotation.
                let mut c = tls_client(addr, &ca, None)
                    .await
                    .expect("connect during rotation");
                let p = prompt_tokens(12 + i as usize, 100 + done);
                let got = complete(&mut c, greedy_request(&p, 4))
                    .await
                    .expect("request during rotation");
                assert_eq!(got.tokens, reference(&model, &p, 4));
                done += 1;
            }
            done
        }));
    }

    // Rotate: a new key and certificate written over the old files.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rotated = pki
        .ca
        .issue(&["localhost".into(), "127.0.0.1".into()])
        .unwrap();
    let written = Instant::now();
    std::fs::write(&pki.key, &rotated.key_pem).unwrap();
    std::fs::write(&pki.cert, &rotated.cert_pem).unwrap();
    let new = der_of(&pki.cert);
    assert_ne!(new, old);
    let served_after = loop {
        if served_cert(cluster.router, &pki.ca_pem, b"h2").await == new {
            break written.elapsed();
        }
        assert!(
            written.elapsed() < Duration::from_secs(5),
            "the new certificate was not served within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!(
        "certificate reload: file written -> new certificate served in {:.0} ms",
        served_after.as_secs_f64() * 1e3
    );
    // The HTTP listener shares the certificate.
    let http = cluster.http.expect("the router serves HTTP");
    assert_eq!(served_cert(http, &pki.ca_pem, b"http/1.1").await, new);

    // The stream from before the rotation runs to its last token, on its
    // old connection, with the tokens greedy decoding gives; it was still
    // streaming when the files were replaced.
    let (long_tokens, finished, last_at) = long.await.unwrap();
    assert_eq!(finished, Some(pb::FinishReason::Length as i32));
    assert_eq!(
        long_tokens,
        reference(&model, &long_prompt, long_len as usize)
    );
    assert!(
        last_at.is_some_and(|t| t > written),
        "the long stream ended before the rotation began: make it longer"
    );
    load_stop.cancel();
    for l in load {
        assert!(l.await.unwrap() > 0, "a load task completed no request");
    }
}

fn prompt_tokens(len: usize, salt: u32) -> Vec<u32> {
    prompt(len, salt)
}

#[tokio::test]
async fn bad_client_tls_files_stop_the_router_at_start_naming_the_file() {
    let (_dir, model) = small_model();
    let pki = Pki::new();
    let other = Pki::new();
    let membership = Arc::new(tandem_cluster::StaticMembership::new(&[], &[]));
    for (tls, needle) in [
        (
            ClientTlsSection {
                cert: pki.dir.path().join("missing.pem"),
                ..pki.section(false)
            },
            "[router.tls] cert",
        ),
        (
            // The key of another certificate.
            ClientTlsSection {
                key: other.key.clone(),
                ..pki.section(false)
            },
            "does not fit cert",
        ),
        (
            ClientTlsSection {
                client_ca: Some(pki.key.clone()),
                ..pki.section(false)
            },
            "[router.tls] client_ca",
        ),
    ] {
        let mut config = ClusterSpec::default().router;
        config.client_tls = Some(tls);
        let shutdown = tokio_util::sync::CancellationToken::new();
        let err = tandem_router::serve(
            model.clone(),
            None,
            config,
            membership.clone(),
            shutdown.clone(),
        )
        .await
        .expect_err("the router must not start");
        shutdown.cancel();
        let err = err.to_string();
        assert!(err.contains(needle), "{needle}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_serves_its_rotated_certificate_on_its_internal_grpc_listener() {
    let (_dir, model) = small_model();
    let pki = Pki::new();
    let node = write_certs(
        pki.dir.path(),
        &pki.ca,
        "decode",
        &["localhost", "127.0.0.1"],
    );
    let (client_cert, client_key) = pki.client_cert();
    let mut decode = ClusterSpec::default().decode;
    decode.tls = Some(node.clone());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let d = tandem_decode::serve(model, decode, shutdown.clone())
        .await
        .expect("decode node");
    let identity = Some((client_cert.as_path(), client_key.as_path()));
    let served = || served_cert_to(d.grpc_addr, &node.ca, b"h2", identity);
    assert_eq!(served().await, der_of(&node.cert));

    // A bad key keeps the old certificate in use.
    std::fs::write(&node.key, "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(served().await, der_of(&node.cert));

    let rotated = pki
        .ca
        .issue(&["localhost".into(), "127.0.0.1".into()])
        .unwrap();
    let written = Instant::now();
    std::fs::write(&node.key, &rotated.key_pem).unwrap();
    std::fs::write(&node.cert, &rotated.cert_pem).unwrap();
    let new = der_of(&node.cert);
    while served().await != new {
        assert!(
            written.elapsed() < Duration::from_secs(5),
            "the node's new certificate was not served within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!(
        "decode node gRPC certificate reload: {:.0} ms",
        written.elapsed().as_secs_f64() * 1e3
    );
    shutdown.cancel();
}
