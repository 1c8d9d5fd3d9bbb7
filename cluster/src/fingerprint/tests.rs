use std::io::Write;

use tandem_engine::synth::{SynthSpec, write_model_dir};

use super::*;

fn small(seed: u64, num_layers: usize) -> SynthSpec {
    SynthSpec {
        vocab_size: 300,
        hidden_size: 64,
        intermediate_size: 128,
        num_layers,
        num_heads: 4,
        num_kv_heads: 2,
        max_position_embeddings: 256,
        seed,
        ..SynthSpec::default()
    }
}

fn model(dir: &Path, spec: &SynthSpec) -> ModelDir {
    write_model_dir(dir, spec).unwrap();
    ModelDir::open(dir).unwrap()
}

#[test]
fn text_form_round_trips_and_bad_text_is_refused() {
    let f = ModelFingerprint {
        config: 1,
        tokenizer: 0xabcdef,
        chat_template: u64::MAX,
        weights: 0x0123_4567_89ab_cdef,
    };
    let text = f.to_string();
    assert_eq!(
        text,
        "c0000000000000001.t0000000000abcdef.pffffffffffffffff.w0123456789abcdef"
    );
    assert_eq!(text.parse::<ModelFingerprint>().unwrap(), f);
    let json = serde_json::to_string(&f).unwrap();
    assert_eq!(serde_json::from_str::<ModelFingerprint>(&json).unwrap(), f);
    assert_eq!(f.short(), "01234567");
    for bad in [
        "",
        "c1.t2.p3.w4",
        "x0000000000000001.t0000000000abcdef.pffffffffffffffff.w0123456789abcdef",
        "c0000000000000001.t0000000000abcdef.pffffffffffffffff",
        "c000000000000000g.t0000000000abcdef.pffffffffffffffff.w0123456789abcdef",
    ] {
        assert!(bad.parse::<ModelFingerprint>().is_err(), "{bad:?}");
    }
}

#[test]
fn another_seed_differs_in_weights_and_another_shape_in_config() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let base = ModelFingerprint::of(&model(a.path(), &small(1, 2))).unwrap();
    let seed = ModelFingerprint::of(&model(b.path(), &small(2, 2))).unwrap();
    let shape = ModelFingerprint::of(&model(c.path(), &small(1, 3))).unwrap();
    assert_eq!(base.difference(&base), None);
    assert_eq!(base.difference(&seed).as_deref(), Some("weights differ"));
    assert_eq!(
        (base.tokenizer, base.chat_template),
        (seed.tokenizer, seed.chat_template)
    );
    let why = base.difference(&shape).unwrap();
    assert!(why.starts_with("model config (shape), weights"), "{why}");
    assert_ne!(base.digest(), seed.digest());
    assert_ne!(base.digest(), shape.digest());
    // The same files give the same fingerprint wherever they are.
    let d = tempfile::tempdir().unwrap();
    let again = ModelFingerprint::of(&model(d.path(), &small(1, 2))).unwrap();
    assert_eq!(again, base);
}

#[test]
fn the_weights_digest_is_cached_and_a_changed_file_invalidates_it() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), &small(7, 2));
    let (first, source) = ModelFingerprint::of_with_source(&m).unwrap();
    assert_eq!(source, WeightsSource::Computed);
    let entry = dir.path().join(".tandem-fingerprint");
    assert!(entry.is_file(), "no cache entry beside the model");

    let (second, source) = ModelFingerprint::of_with_source(&m).unwrap();
    assert_eq!((second, source), (first, WeightsSource::Cached));
    // The entry is what is read: a doctored digest comes back as is.
    let text = std::fs::read_to_string(&entry).unwrap();
    let doctored = text.replace(&format!("{:016x}", first.weights), "00000000000000aa");
    assert_ne!(text, doctored);
    std::fs::write(&entry, doctored).unwrap();
    let (digest, source) = weights_digest(dir.path()).unwrap();
    assert_eq!((digest, source), (0xaa, WeightsSource::Cached));

    // A weight file rewritten (one byte longer) is hashed again.
    let weights = dir.path().join("model.safetensors");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&weights)
        .unwrap()
        .write_all(&[0])
        .unwrap();
    let (changed, source) = ModelFingerprint::of_with_source(&m).unwrap();
    assert_eq!(source, WeightsSource::Computed);
    assert_ne!(changed.weights, first.weights);
    assert_eq!(changed.config, first.config);
    // A corrupt entry is recomputed, never trusted.
    std::fs::write(&entry, b"{not json").unwrap();
    let (again, source) = weights_digest(dir.path()).unwrap();
    assert_eq!((again, source), (changed.weights, WeightsSource::Computed));
}

#[test]
fn a_gguf_file_is_cached_beside_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.gguf");
    std::fs::write(&file, vec![3u8; 3 * READ_CHUNK + 17]).unwrap();
    let (digest, source) = weights_digest(&file).unwrap();
    assert_eq!(source, WeightsSource::Computed);
    assert!(dir.path().join("m.gguf.tandem-fingerprint").is_file());
    assert_eq!(
        weights_digest(&file).unwrap(),
        (digest, WeightsSource::Cached)
    );
}

#[test]
fn a_directory_without_weights_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        weights_digest(dir.path()),
        Err(FingerprintError::NoWeights(_))
    ));
}

#[test]
fn the_config_pins_a_fingerprint_for_the_router_or_names_a_bad_one() {
    let pin = "c0000000000000001.t0000000000000002.p0000000000000003.w0000000000000004";
    let config =
        crate::Config::parse(&format!("[model]\nfingerprint = \"{pin}\"\n[router]\n")).unwrap();
    let want: ModelFingerprint = pin.parse().unwrap();
    assert_eq!(config.model.fingerprint, Some(want));
    assert_eq!(config.router.unwrap().model_fingerprint, Some(want));
    let unpinned = crate::Config::parse("[router]\n").unwrap();
    assert_eq!(unpinned.router.unwrap().model_fingerprint, None);
    let err = crate::Config::parse("[model]\nfingerprint = \"w1234\"\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fingerprint") && err.contains("w1234"),
        "{err}"
    );
}
