use super::*;

fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
    let mut p = SamplingParams {
        seed: Some(7),
        ..Default::default()
    };
    f(&mut p);
    p
}

#[test]
fn greedy_takes_the_max_and_breaks_ties_low() {
    let mut s = Sampler::new(SamplingParams::default(), &[]);
    assert_eq!(s.sample(&mut [0.1, 3.0, 3.0, -1.0]), 1);
}

#[test]
fn same_seed_same_stream() {
    let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
    let run = |seed| {
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 1.0;
                p.seed = Some(seed)
            }),
            &[],
        );
        (0..40)
            .map(|_| s.sample(&mut logits.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn device_draws_follow_the_same_stream_as_host_sampling() {
    let logits: Vec<f32> = (0..64).map(|i| (i as f32 * 0.71).cos() * 3.0).collect();
    let p = params(|p| {
        p.temperature = 0.8;
        p.top_k = 20;
        p.top_p = 0.9;
    });
    let mut host = Sampler::new(p.clone(), &[]);
    let mut device = Sampler::new(p, &[]);
    assert!(device.draws_from_raw_logits());
    for _ in 0..50 {
        let a = host.sample(&mut logits.clone());
        let d = device.next_draw();
        let b = d.choose(&logits);
        device.observe(b);
        assert_eq!(a, b);
        // The token drawn is in the kept set.
        assert!(d.distribution(&logits)[b as usize] > 0.0);
    }
    let dist = TokenDraw::new(
        &params(|p| {
            p.temperature = 1.0;
            p.top_k = 3;
        }),
        0.5,
    )
    .distribution(&logits);
    assert_eq!(dist.iter().filter(|&&x| x > 0.0).count(), 3);
    assert!((dist.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    let penalised = Sampler::new(params(|p| p.repetition_penalty = 1.2), &[1]);
    assert!(!penalised.draws_from_raw_logits());
}

#[test]
fn top_k_one_is_greedy() {
    let mut s = Sampler::new(
        params(|p| {
            p.temperature = 5.0;
            p.top_k = 1
        }),
        &[],
    );
    for _ in 0..20 {
        assert_eq!(s.sample(&mut [0.0, 1.0, 0.5]), 1);
    }
}

#[test]
fn top_p_and_min_p_cut_the_tail() {
    // Probabilities ~ [0.64, 0.23, 0.09, 0.03, ...]: top_p 0.5 keeps only token 0.
    let logits = [4.0, 3.0, 2.0, 1.0, 0.0];
    let mut s = Sampler::new(
        params(|p| {
            p.temperature = 1.0;
            p.top_p = 0.5
        }),
        &[],
    );
    assert!((0..50).all(|_| s.sample(&mut logits.clone()) == 0));
    let mut s = Sampler::new(
        params(|p| {
            p.temperature = 1.0;
            p.min_p = 0.3
        }),
        &[],
    );
    assert!((0..200).all(|_| s.sample(&mut logits.clone()) <= 1));
}

#[test]
fn high_temperature_explores() {
    let mut s = Sampler::new(params(|p| p.temperature = 100.0), &[]);
    let seen: std::collections::HashSet<u32> = (0..200)
        .map(|_| s.sample(&mut [1.0, 0.0, 0.5, 0.2]))
        .collect();
    assert_eq!(seen.len(), 4);
}

#[test]
fn penalties_move_logits() {
    let mut s = Sampler::new(params(|p| p.repetition_penalty = 2.0), &[0]);
    let mut l = [2.0, -2.0, 1.0];
    s.apply_penalties(&mut l);
    assert_eq!(l, [1.0, -2.0, 1.0]);
    s.observe(1);
    let mut l = [2.0, -2.0, 1.0];
    s.apply_penalties(&mut l);
    assert_eq!(l, [1.0, -4.0, 1.0]);

    let mut s = Sampler::new(
        params(|p| {
            p.presence_penalty = 0.5;
            p.frequency_penalty = 0.25
        }),
        &[],
    );
    s.observe(2);
    s.observe(2);
    let mut l = [0.0, 0.0, 1.0];
    s.apply_penalties(&mut l);
    assert_eq!(l, [0.0, 0.0, 0.0]);
}

/// log_softmax(x / t) written out plainly, in f64.
fn log_softmax(logits: &[f32], t: f64) -> Vec<f64> {
    let x: Vec<f64> = logits.iter().map(|&l| f64::from(l) / t).collect();
    let z: f64 = x.iter().map(|v| v.exp()).sum::<f64>().ln();
    x.iter().map(|v| v - z).collect()
}

#[test]
fn logprobs_are_the_log_softmax_of_the_processed_logits() {
    let raw: Vec<f32> = (0..300).map(|i| (i as f32 * 0.37).sin() * 4.0).collect();
    for (temperature, penalty) in [(0.0, 1.0), (0.0, 1.3), (0.7, 1.0), (1.5, 1.2)] {
        let p = params(|p| {
            p.temperature = temperature;
            p.repetition_penalty = penalty;
            p.presence_penalty = 0.5;
        });
        let mut s = Sampler::new(p.clone(), &[3, 4, 5]);
        let mut plain = Sampler::new(p, &[3, 4, 5]);
        for step in 0..5 {
            // What sampling chooses from: the penalised logits.
            let mut processed = raw.clone();
            s.apply_penalties(&mut processed);
            let t = if temperature > 0.0 {
                f64::from(temperature)
            } else {
                1.0
            };
            let want = log_softmax(&processed, t);
            let (token, lp) = s.sample_with_logprobs(&mut raw.clone(), Some(5));
            let lp = lp.expect("asked for logprobs");
            // The same token as sampling without logprobs, and the same stream.
            assert_eq!(plain.sample(&mut raw.clone()), token, "step {step}");
            assert_eq!(lp.token, token);
            assert!((f64::from(lp.logprob) - want[token as usize]).abs() < 1e-5);
            let mut order: Vec<usize> = (0..want.len()).collect();
            order.sort_by(|&a, &b| want[b].total_cmp(&want[a]).then(a.cmp(&b)));
            assert_eq!(lp.top.len(), 5);
            for (&(id, l), &expect) in lp.top.iter().zip(&order) {
                assert_eq!(id as usize, expect);
                assert!((f64::from(l) - want[expect]).abs() < 1e-5);
            }
            if temperature == 0.0 {
                assert_eq!(lp.top[0].0, token, "greedy picks the most likely");
            }
        }
    }
    // None asked, none computed; 0 asked: the chosen token's alone.
    let mut s = Sampler::new(SamplingParams::default(), &[]);
    assert_eq!(s.sample_with_logprobs(&mut [0.0, 1.0], None).1, None);
    let lp = s.sample_with_logprobs(&mut [0.0, 0.0], Some(0)).1.unwrap();
    assert!(lp.top.is_empty());
    assert!((lp.logprob - 0.5f32.ln()).abs() < 1e-6);
}

#[test]
fn logit_bias_moves_greedy_and_logprobs_follow() {
    let raw = [1.0, 3.0, 2.5, 0.0];
    // -100 on the greedy token: the runner-up wins.
    let p = params(|p| p.logit_bias = BTreeMap::from([(1, -100.0)]));
    let mut s = Sampler::new(p, &[]);
    assert!(!s.draws_from_raw_logits(), "bias needs the host path");
    let (t, lp) = s.sample_with_logprobs(&mut raw.clone(), Some(2));
    assert_eq!(t, 2);
    let lp = lp.unwrap();
    assert_eq!(lp.top[0].0, 2, "log probabilities are of the biased logits");
    let want = log_softmax(&[1.0, -97.0, 2.5, 0.0], 1.0);
    assert!((f64::from(lp.logprob) - want[2]).abs() < 1e-5);
    // A positive bias makes an unlikely token greedy's pick.
    let mut s = Sampler::new(params(|p| p.logit_bias = BTreeMap::from([(3, 5.0)])), &[]);
    assert_eq!(s.sample(&mut raw.clone()), 3);
    // After the penalties: a repeated token's bias still applies in full.
    let mut s = Sampler::new(
        params(|p| {
            p.presence_penalty = 2.0;
            p.logit_bias = BTreeMap::from([(0, 1.5)]);
        }),
        &[],
    );
    s.observe(0);
    let mut l = raw;
    s.sample(&mut l);
    assert_eq!(l[0], 1.0 - 2.0 + 1.5);
    // Out-of-vocabulary ids are skipped, not a panic.
    let mut s = Sampler::new(params(|p| p.logit_bias = BTreeMap::from([(99, 5.0)])), &[]);
    assert_eq!(s.sample(&mut raw.clone()), 1);
}

#[test]
fn banned_ids_are_never_drawn() {
    let raw = [1.0, 3.0, 2.5, 0.0];
    let mut s = Sampler::new(params(|p| p.temperature = 50.0), &[]);
    for _ in 0..200 {
        let (t, lp) = s.sample_banning(&mut raw.clone(), Some(4), &[1, 3]);
        assert!(t == 0 || t == 2, "{t}");
        let lp = lp.unwrap();
        assert_eq!(
            lp.top.iter().find(|e| e.0 == 1).unwrap().1,
            f32::NEG_INFINITY
        );
    }
}

#[test]
fn validation_names_the_parameter() {
    for (p, name) in [
        (params(|p| p.temperature = -1.0), "temperature"),
        (params(|p| p.temperature = f32::NAN), "temperature"),
        (params(|p| p.top_p = 0.0), "top_p"),
        (params(|p| p.top_p = 1.5), "top_p"),
        (params(|p| p.min_p = 2.0), "min_p"),
        (params(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
        (
            params(|p| p.presence_penalty = f32::INFINITY),
            "presence_penalty",
        ),
        (
            params(|p| p.logit_bias = BTreeMap::from([(3, 200.0)])),
            "logit_bias",
        ),
        (
            params(|p| p.logit_bias = BTreeMap::from([(3, f32::NAN)])),
            "logit_bias",
        ),
    ] {
        let err = p.validate().unwrap_err();
        assert_eq!(err.field, name, "{err}");
        assert!(err.message.contains(name), "{err}");
    }
    assert!(SamplingParams::default().validate().is_ok());
}
