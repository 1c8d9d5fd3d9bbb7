//! Bad model files and bad requests: each a typed error naming the problem, never a panic.

use std::path::Path;

use tandem_engine::backend::{BackendExt, KvIo};
use tandem_engine::local::LocalGenerator;
use tandem_engine::synth::{SynthSpec, write_model_dir};
use tandem_engine::{EngineError, GenerationParams, ModelDir};

fn small() -> SynthSpec {
    SynthSpec {
        hidden_size: 32,
        intermediate_size: 64,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 1,
        max_position_embeddings: 64,
        ..Default::default()
    }
}

fn synth() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_model_dir(dir.path(), &small()).unwrap();
    dir
}

fn load(dir: &Path) -> Result<(), EngineError> {
    ModelDir::open(dir)?.load_cpu(4, 16).map(|_| ())
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, v.to_string()).unwrap();
}

#[test]
fn truncated_safetensors() {
    let d = synth();
    let path = d.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let err = load(d.path()).unwrap_err();
    assert!(matches!(err, EngineError::Weights { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn corrupt_safetensors_header() {
    let d = synth();
    let path = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8] = b'#'; // the opening brace of the JSON header
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        load(d.path()).unwrap_err(),
        EngineError::Weights { .. }
    ));
    std::fs::write(&path, b"\xff\xff").unwrap();
    assert!(matches!(
        load(d.path()).unwrap_err(),
        EngineError::Weights { .. }
    ));
}

#[test]
fn missing_weights_file_and_tensor() {
    let d = synth();
    edit_config(d.path(), |c| c["num_hidden_layers"] = 2.into());
    let err = load(d.path()).unwrap_err();
    assert!(
        err.to_string()
            .contains("model.layers.1.input_layernorm.weight"),
        "{err}"
    );
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    assert!(matches!(
        load(d.path()).unwrap_err(),
        EngineError::Io { .. }
    ));
}

#[test]
fn wrong_tensor_shape() {
    let d = synth();
    edit_config(d.path(), |c| c["intermediate_size"] = 65.into());
    let err = load(d.path()).unwrap_err();
    assert!(matches!(err, EngineError::TensorShape { .. }), "{err}");
    assert!(err.to_string().contains("gate_proj"), "{err}");
}

#[test]
fn config_missing_field_or_unknown_architecture() {
    let d = synth();
    edit_config(d.path(), |c| {
        c.as_object_mut().unwrap().remove("hidden_size");
    });
    let err = ModelDir::open(d.path()).err().unwrap();
    assert!(
        err.to_string().contains("hidden_size") && err.to_string().contains("config.json"),
        "{err}"
    );
    let d = synth();
    edit_config(d.path(), |c| {
        c["architectures"] = serde_json::json!(["FalconForCausalLM"])
    });
    let err = ModelDir::open(d.path()).err().unwrap();
    assert!(matches!(err, EngineError::UnsupportedArchitecture(ref a) if a == "FalconForCausalLM"));
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    assert!(matches!(
        ModelDir::open(d.path()).err().unwrap(),
        EngineError::Config { .. }
    ));
}

#[test]
fn tokenizer_larger_than_vocab() {
    let d = synth();
    edit_config(d.path(), |c| c["vocab_size"] = 100.into());
    let err = ModelDir::open(d.path()).err().unwrap();
    assert!(matches!(err, EngineError::Tokenizer(_)), "{err}");
    assert!(err.to_string().contains("vocab_size is 100"), "{err}");
}

#[test]
fn bad_requests() {
    let d = synth();
    let m = ModelDir::open(d.path()).unwrap();
    let mut backend = m.load_cpu(8, 16).unwrap();
    let table = [0, 1, 2, 3];
    let err = backend.prefill(&[1, 2, 100_000], 0, &table).unwrap_err();
    assert!(
        err.to_string()
            .contains("token id 100000 is out of the vocabulary"),
        "{err}"
    );
    let err = backend.prefill(&[], 0, &table).unwrap_err();
    assert!(matches!(err, EngineError::InvalidInput(_)));
    let long: Vec<u32> = vec![5; 65];
    let err = backend.prefill(&long, 0, &[0, 1, 2, 3, 4]).unwrap_err();
    assert!(
        err.to_string()
            .contains("longer than the model's context of 64"),
        "{err}"
    );
    let err = backend.prefill(&[1; 20], 0, &[0]).unwrap_err();
    assert!(err.to_string().contains("block table"), "{err}");
    assert!(backend.import_layer(0, &[0], &[1, 2, 3]).is_err());
    assert!(backend.export_layer(7, &[0]).is_err());

    let mut g = LocalGenerator::new(backend);
    let params = GenerationParams::default();
    assert!(g.generate(&[], &params, &m.tokenizer, |_| {}).is_err());
    assert!(g.generate(&[3; 64], &params, &m.tokenizer, |_| {}).is_err());
    let bad = GenerationParams {
        max_tokens: 0,
        ..Default::default()
    };
    assert!(g.generate(&[3], &bad, &m.tokenizer, |_| {}).is_err());
    assert_eq!(g.free_blocks(), 8, "failed requests leak no blocks");
    // The generator still serves a good request afterwards.
    let out = g.generate(&[3, 4], &params, &m.tokenizer, |_| {}).unwrap();
    assert!(!out.tokens.is_empty());
    assert_eq!(g.free_blocks(), 8);
}
