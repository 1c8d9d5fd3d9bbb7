//! A decode node refuses KV computed by another model (defence in depth:
//! the router never pairs such nodes, and a prefill node refuses the
//! target). A sender that claims another model fingerprint in its Final
//! frame gets the transfer refused; the decode request ends with
//! FAILED_PRECONDITION (a pairing error, not the client's INVALID_ARGUMENT)
//! and the reservation's blocks are free again. The same KV from a sender of
//! the node's own model is accepted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::bytes::Bytes;
use rustls::pki_types::CertificateDer;
use tandem_cluster::{Config, ModelFingerprint};
use tandem_kv_transfer::tls::client_config_trusting;
use tandem_kv_transfer::{FirstToken, KvSender, LayerShape, SenderConfig, WireDtype};
use tandem_proto::v1 as pb;
use tandem_proto::v1::decode_node_client::DecodeNodeClient;
use tandem_tests::small_model;
use tokio_util::sync::CancellationToken;

/// Sends zeros for every block of every layer the target reserves, then
/// the Final frame, claiming `fingerprint`.
async fn ship(target: &pb::KvTarget, fingerprint: u64) {
    let cert = CertificateDer::from(target.server_cert_der.clone());
    let tls = client_config_trusting(&cert).unwrap();
    let config = SenderConfig {
        server_name: target.server_name.clone(),
        model_fingerprint: fingerprint,
        ..SenderConfig::default()
    };
    let sender = KvSender::connect_with(target.quic_addr.parse().unwrap(), tls, config)
        .await
        .unwrap();
    let mut stream = sender.open_request(target.transfer_id).await.unwrap();
    let dtype = WireDtype::from_code(target.dtype as u8).unwrap();
    for layer in 0..target.num_layers {
        let shape = LayerShape {
            layer: layer as u16,
            first_block: 0,
            block_count: target.num_blocks,
            dtype,
            head_start: 0,
            head_count: target.num_kv_heads as u16,
            total_heads: target.num_kv_heads as u16,
            head_dim: target.head_dim as u16,
            block_size: target.block_size as u16,
        };
        let payload = vec![0u8; shape.payload_len().unwrap() as usize];
        stream
            .send_layer(shape, Bytes::from(payload))
            .await
            .unwrap();
    }
    // Delivery, not acceptance: a refusal may come after the last ack.
    let first = FirstToken {
        id: 1,
        logprobs: None,
    };
    let _ = stream.finish(&first, target.num_layers).await;
    sender.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decode_node_refuses_kv_of_another_model() {
    let (_dir, model) = small_model();
    let ours = ModelFingerprint::of(&model).unwrap();
    let mut config = Config::parse(
        "[decode]\nlisten = \"127.0.0.1:0\"\nquic_listen = \"127.0.0.1:0\"\nkv_blocks = 64\nlocal_prefill_below = 4\n",
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let decode = tandem_decode::serve(
        model.clone(),
        config.decode.take().unwrap(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    let stats = Arc::clone(&decode.stats);
    let mut client = DecodeNodeClient::connect(format!("http://{}", decode.grpc_addr))
        .await
        .unwrap();
    let other = ModelFingerprint {
        weights: ours.weights ^ 1,
        ..ours
    };
    for (attempt, (claimed, accepted)) in [(other.digest(), false), (ours.digest(), true)]
        .into_iter()
        .enumerate()
    {
        let request = pb::DecodeRequest {
            request_id: "kv-identity".into(),
            prompt: (10..50).collect(),
            max_tokens: 3,
            kv_timeout_ms: 20_000,
            attempt: attempt as u32 + 1,
            ..Default::default()
        };
        let mut stream = client.decode(request).await.unwrap().into_inner();
        let target = match stream.message().await.unwrap().and_then(|m| m.event) {
            Some(pb::decode_response::Event::Admitted(a)) => a.kv_target.expect("a KV target"),
            other => panic!("expected Admitted, got {other:?}"),
        };
        assert_eq!(target.model_fingerprint, ours.to_string());
        ship(&target, claimed).await;
        let mut tokens = 0;
        let ended = loop {
            match stream.message().await {
                Ok(Some(pb::DecodeResponse {
                    event: Some(pb::decode_response::Event::Token(t)),
                })) => tokens += t.ids.len(),
                Ok(Some(pb::DecodeResponse {
                    event: Some(pb::decode_response::Event::Finished(_)),
                })) => break Ok(tokens),
                Ok(other) => panic!("unexpected {other:?}"),
                Err(status) => break Err(status),
            }
        };
        if accepted {
            let n = ended.expect("the same model's KV is accepted");
            assert!((1..=3).contains(&n), "{n} tokens");
        } else {
            let status = ended.expect_err("another model's KV is refused");
            assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
            assert!(
                status.message().contains("another model"),
                "{}",
                status.message()
            );
        }
        // Either way the blocks come back.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = stats.lock().unwrap().clone();
            if s.kv_blocks_free == s.kv_blocks_total && s.running == 0 && s.queued == 0 {
                break;
            }
            assert!(Instant::now() < deadline, "KV blocks not released: {s:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    shutdown.cancel();
}
