//! Sampling: each filter's exact distribution on small known cases, agreement
//! with a plain full-sort reference on a real-sized vocabulary, seeded draws
//! whose frequencies match the distribution, and greedy drawing nothing.

use selective::generate::sampling::{Sampler, SamplingConfig};
use selective::rng::Rng;

/// Logits whose softmax is `probs`.
fn logits_of(probs: &[f64]) -> Vec<f32> {
    probs.iter().map(|&p| p.ln() as f32).collect()
}

fn distribution(config: SamplingConfig, logits: &[f32], recent: &[u32]) -> Vec<f32> {
    Sampler::new(config)
        .unwrap()
        .distribution(logits, recent)
        .unwrap()
}

#[track_caller]
fn assert_close(found: &[f32], expected: &[f64]) {
    assert_eq!(found.len(), expected.len());
    for (i, (&f, &e)) in found.iter().zip(expected).enumerate() {
        assert!(
            (f as f64 - e).abs() <= 1e-6,
            "token {i}: {f} but expected {e}\n found {found:?}\n expected {expected:?}"
        );
    }
}

fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}

fn normalised(weights: &[f64]) -> Vec<f64> {
    let sum: f64 = weights.iter().sum();
    weights.iter().map(|w| w / sum).collect()
}

#[test]
fn defaults_and_greedy_constructor() {
    let d = SamplingConfig::default();
    assert_eq!(d.temperature, 1.0);
    assert_eq!(d.top_k, 0);
    assert_eq!(d.top_p, 1.0);
    assert_eq!(d.min_p, 0.0);
    assert_eq!(d.repetition_penalty, 1.0);
    assert_eq!(d.repetition_window, 64);
    assert_eq!(d.seed, 0);
    assert!(!d.is_greedy());
    let g = SamplingConfig::greedy();
    assert!(g.is_greedy());
    assert_eq!(g.temperature, 0.0);
    assert!(SamplingConfig {
        top_k: 1,
        ..SamplingConfig::default()
    }
    .is_greedy());
}

#[test]
fn bad_values_are_rejected_with_the_field_named() {
    let d = SamplingConfig::default;
    let cases = [
        (
            SamplingConfig {
                temperature: -0.1,
                ..d()
            },
            "temperature",
        ),
        (
            SamplingConfig {
                temperature: f32::NAN,
                ..d()
            },
            "temperature",
        ),
        (
            SamplingConfig {
                temperature: f32::INFINITY,
                ..d()
            },
            "temperature",
        ),
        (SamplingConfig { top_p: 0.0, ..d() }, "top_p"),
        (SamplingConfig { top_p: 1.5, ..d() }, "top_p"),
        (SamplingConfig { top_p: -0.5, ..d() }, "top_p"),
        (SamplingConfig { min_p: -0.1, ..d() }, "min_p"),
        (SamplingConfig { min_p: 1.01, ..d() }, "min_p"),
        (
            SamplingConfig {
                repetition_penalty: 0.0,
                ..d()
            },
            "repetition_penalty",
        ),
        (
            SamplingConfig {
                repetition_penalty: -1.2,
                ..d()
            },
            "repetition_penalty",
        ),
    ];
    for (config, field) in cases {
        let err = match Sampler::new(config.clone()) {
            Ok(_) => panic!("{config:?} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(field), "{config:?}: message {err:?}");
    }
    // The edges that are allowed.
    for config in [
        SamplingConfig { top_p: 1.0, ..d() },
        SamplingConfig { min_p: 1.0, ..d() },
        SamplingConfig { min_p: 0.0, ..d() },
        SamplingConfig::greedy(),
    ] {
        Sampler::new(config).unwrap();
    }
}

#[test]
fn no_filter_is_the_softmax() {
    let logits = [1.0f32, -0.5, 2.0, 0.25];
    let expected = softmax(&logits.map(f64::from));
    assert_close(
        &distribution(SamplingConfig::default(), &logits, &[]),
        &expected,
    );
}

#[test]
fn top_p_keeps_the_smallest_set_reaching_p() {
    let probs = [0.5, 0.3, 0.15, 0.05];
    let logits = logits_of(&probs);
    let top_p = |p: f32| SamplingConfig {
        top_p: p,
        ..SamplingConfig::default()
    };
    // 0.5 + 0.3 reaches 0.8 exactly: those two, renormalised.
    assert_close(
        &distribution(top_p(0.8), &logits, &[]),
        &[0.625, 0.375, 0.0, 0.0],
    );
    // Just above 0.8 needs the third.
    assert_close(
        &distribution(top_p(0.81), &logits, &[]),
        &normalised(&[0.5, 0.3, 0.15, 0.0]),
    );
    // Tiny p still keeps the most likely token.
    assert_close(
        &distribution(top_p(0.01), &logits, &[]),
        &[1.0, 0.0, 0.0, 0.0],
    );
    assert_close(&distribution(top_p(1.0), &logits, &[]), &probs);
    // Order in the vocabulary does not matter.
    let shuffled = logits_of(&[0.15, 0.5, 0.05, 0.3]);
    assert_close(
        &distribution(top_p(0.8), &shuffled, &[]),
        &[0.0, 0.625, 0.0, 0.375],
    );
}

#[test]
fn top_k_keeps_the_k_most_likely_lowest_index_on_ties() {
    let logits = logits_of(&[0.5, 0.3, 0.15, 0.05]);
    let top_k = |k: usize| SamplingConfig {
        top_k: k,
        ..SamplingConfig::default()
    };
    assert_close(
        &distribution(top_k(2), &logits, &[]),
        &[0.625, 0.375, 0.0, 0.0],
    );
    assert_close(
        &distribution(top_k(3), &logits, &[]),
        &normalised(&[0.5, 0.3, 0.15, 0.0]),
    );
    // k beyond the vocabulary keeps everything.
    assert_close(
        &distribution(top_k(10), &logits, &[]),
        &[0.5, 0.3, 0.15, 0.05],
    );
    // Three tokens tie for the top; k = 2 keeps the two lowest ids.
    let tied = [2.0f32, 1.0, 2.0, 2.0];
    assert_close(&distribution(top_k(2), &tied, &[]), &[0.5, 0.0, 0.5, 0.0]);
}

#[test]
fn top_p_measures_what_top_k_kept() {
    let logits = logits_of(&[0.4, 0.3, 0.2, 0.1]);
    // Alone, 0.4 + 0.3 = 0.7 < 0.75 so three tokens stay.
    let alone = SamplingConfig {
        top_p: 0.75,
        ..SamplingConfig::default()
    };
    assert_close(
        &distribution(alone.clone(), &logits, &[]),
        &normalised(&[0.4, 0.3, 0.2, 0.0]),
    );
    // After top-3 the first two hold 7/9 > 0.75 of the renormalised mass.
    let after_top_k = SamplingConfig { top_k: 3, ..alone };
    assert_close(
        &distribution(after_top_k, &logits, &[]),
        &normalised(&[0.4, 0.3, 0.0, 0.0]),
    );
}

#[test]
fn min_p_compares_with_the_true_maximum_not_token_0() {
    // Token 1 is the most likely. min_p 0.4 keeps p >= 0.4 * 0.5 = 0.2. Were
    // token 0 (p 0.1) taken as the maximum, as the official code does, the
    // cut-off would be 0.04 and every token would stay.
    let logits = logits_of(&[0.1, 0.5, 0.25, 0.15]);
    let config = SamplingConfig {
        min_p: 0.4,
        ..SamplingConfig::default()
    };
    assert_close(
        &distribution(config, &logits, &[]),
        &normalised(&[0.0, 0.5, 0.25, 0.0]),
    );
    // min_p 1 keeps only the maximum.
    let config = SamplingConfig {
        min_p: 1.0,
        ..SamplingConfig::default()
    };
    assert_close(&distribution(config, &logits, &[]), &[0.0, 1.0, 0.0, 0.0]);
}

#[test]
fn temperature_scales_the_logits() {
    let probs = [0.5, 0.3, 0.2];
    let logits = logits_of(&probs);
    let at = |t: f32| SamplingConfig {
        temperature: t,
        ..SamplingConfig::default()
    };
    // 1/0.5 = 2: each probability squared, then renormalised.
    assert_close(
        &distribution(at(0.5), &logits, &[]),
        &normalised(&probs.map(|p| p * p)),
    );
    assert_close(
        &distribution(at(2.0), &logits, &[]),
        &normalised(&probs.map(f64::sqrt)),
    );
    // Temperature comes before min-p: at 0.5, 0.2 is 0.16 of the maximum
    // (0.4 at temperature 1), so min_p 0.3 now drops it.
    let config = SamplingConfig {
        min_p: 0.3,
        ..at(0.5)
    };
    assert_close(
        &distribution(config, &logits, &[]),
        &normalised(&[0.25, 0.09, 0.0]),
    );
}

#[test]
fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once() {
    let logits = [2.0f32, -1.0, 0.5, 1.0];
    let config = SamplingConfig {
        repetition_penalty: 2.0,
        ..SamplingConfig::default()
    };
    // Tokens 0 and 1 occur twice each but are penalised once.
    let recent = [0, 1, 1, 0];
    assert_close(
        &distribution(config.clone(), &logits, &recent),
        &softmax(&[1.0, -2.0, 0.5, 1.0]),
    );
    // A penalty below 1 favours repetition, the same way round.
    let favour = SamplingConfig {
        repetition_penalty: 0.5,
        ..config.clone()
    };
    assert_close(
        &distribution(favour, &logits, &recent),
        &softmax(&[4.0, -0.5, 0.5, 1.0]),
    );
    // Only the last `repetition_window` tokens count: token 2 here.
    let window_1 = SamplingConfig {
        repetition_window: 1,
        ..config.clone()
    };
    assert_close(
        &distribution(window_1, &logits, &[1, 0, 2]),
        &softmax(&[2.0, -1.0, 0.25, 1.0]),
    );
    let window_0 = SamplingConfig {
        repetition_window: 0,
        ..config.clone()
    };
    assert_close(
        &distribution(window_0, &logits, &[1, 0, 2]),
        &softmax(&[2.0, -1.0, 0.5, 1.0]),
    );
    // Penalty 1 is off: no change.
    assert_close(
        &distribution(SamplingConfig::default(), &logits, &recent),
        &softmax(&[2.0, -1.0, 0.5, 1.0]),
    );
    // A recent token outside the vocabulary is an error.
    assert!(Sampler::new(config)
        .unwrap()
        .distribution(&logits, &[7])
        .is_err());
}

#[test]
fn greedy_takes_the_argmax_after_the_penalty_and_never_draws() {
    let logits = [0.5f32, 2.0, 2.0, 1.5];
    for config in [
        SamplingConfig::greedy(),
        SamplingConfig {
            top_k: 1,
            temperature: 0.7,
            ..SamplingConfig::default()
        },
    ] {
        let mut sampler = Sampler::new(SamplingConfig { seed: 99, ..config }).unwrap();
        let before = sampler.rng().state();
        for _ in 0..100 {
            // Ties go to the lowest index.
            assert_eq!(sampler.sample(&logits, &[]).unwrap(), 1);
        }
        assert_eq!(sampler.rng().state(), before, "greedy drew a number");
        assert_close(
            &sampler.distribution(&logits, &[]).unwrap(),
            &[0.0, 1.0, 0.0, 0.0],
        );
    }
    // The penalty comes first: 2.0 / 2 = 1.0 for tokens 1 and 2, so 3 wins.
    let mut sampler = Sampler::new(SamplingConfig {
        repetition_penalty: 2.0,
        ..SamplingConfig::greedy()
    })
    .unwrap();
    assert_eq!(sampler.sample(&logits, &[2, 1]).unwrap(), 3);
    // A sampling configuration does draw.
    let mut sampler = Sampler::new(SamplingConfig::default()).unwrap();
    let before = sampler.rng().state();
    sampler.sample(&logits, &[]).unwrap();
    assert_ne!(sampler.rng().state(), before);
}

#[test]
fn nan_counts_as_minus_infinity_and_hopeless_rows_are_errors() {
    let logits = [f32::NAN, 0.0, f32::NEG_INFINITY, 0.0];
    assert_close(
        &distribution(SamplingConfig::default(), &logits, &[]),
        &[0.0, 0.5, 0.0, 0.5],
    );
    let mut greedy = Sampler::new(SamplingConfig::greedy()).unwrap();
    assert_eq!(greedy.sample(&[f32::NAN, -3.0, -1.0], &[]).unwrap(), 2);
    let mut sampler = Sampler::new(SamplingConfig::default()).unwrap();
    for bad in [
        vec![],
        vec![f32::NAN, f32::NAN],
        vec![f32::NEG_INFINITY; 3],
        vec![0.0, f32::INFINITY],
    ] {
        assert!(sampler.sample(&bad, &[]).is_err(), "{bad:?} was accepted");
        assert!(greedy.sample(&bad, &[]).is_err(), "{bad:?} was accepted");
    }
}

/// Draws `n` tokens and checks each token's count is within 5 binomial
/// standard deviations of n * p; tokens with p = 0 must never come.
#[track_caller]
fn check_frequencies(config: SamplingConfig, logits: &[f32], recent: &[u32], n: usize) {
    let mut sampler = Sampler::new(config).unwrap();
    let probs = sampler.distribution(logits, recent).unwrap();
    let mut counts = vec![0usize; logits.len()];
    for _ in 0..n {
        counts[sampler.sample(logits, recent).unwrap() as usize] += 1;
    }
    for (i, (&p, &count)) in probs.iter().zip(&counts).enumerate() {
        let p = p as f64;
        if p == 0.0 {
            assert_eq!(count, 0, "token {i} has probability 0 but was drawn");
            continue;
        }
        let mean = n as f64 * p;
        let sigma = (n as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (count as f64 - mean).abs() <= 5.0 * sigma.max(1.0),
            "token {i}: {count} draws, expected {mean:.1} +- {sigma:.1}\n counts {counts:?}\n probs {probs:?}"
        );
    }
}

#[test]
fn draws_follow_the_distribution() {
    let logits = logits_of(&[0.4, 0.25, 0.2, 0.1, 0.04, 0.01]);
    check_frequencies(SamplingConfig::default(), &logits, &[], 20_000);
    check_frequencies(
        SamplingConfig {
            temperature: 0.7,
            top_k: 4,
            top_p: 0.9,
            seed: 5,
            ..SamplingConfig::default()
        },
        &logits,
        &[],
        20_000,
    );
    check_frequencies(
        SamplingConfig {
            repetition_penalty: 1.5,
            min_p: 0.1,
            seed: 11,
            ..SamplingConfig::default()
        },
        &logits,
        &[0, 0, 2],
        20_000,
    );
}

#[test]
fn a_skewed_sampler_would_fail_the_frequency_check() {
    // The check itself must be able to fail: uniform draws from a skewed
    // distribution are far outside 5 sigma.
    let probs = [0.4, 0.25, 0.2, 0.1, 0.04, 0.01];
    let mut rng = Rng::new(1);
    let n = 20_000;
    let mut counts = [0usize; 6];
    for _ in 0..n {
        counts[rng.below(6)] += 1;
    }
    let worst = probs
        .iter()
        .zip(counts)
        .map(|(&p, c)| (c as f64 - n as f64 * p).abs() / (n as f64 * p * (1.0 - p)).sqrt())
        .fold(0.0, f64::max);
    assert!(worst > 5.0, "uniform draws passed as skewed: {worst}");
}

fn draws(seed: u64, n: usize) -> Vec<u32> {
    let logits = logits_of(&[0.3, 0.3, 0.2, 0.1, 0.1]);
    let mut sampler = Sampler::new(SamplingConfig {
        seed,
        ..SamplingConfig::default()
    })
    .unwrap();
    (0..n)
        .map(|_| sampler.sample(&logits, &[]).unwrap())
        .collect()
}

#[test]
fn same_seed_same_sequence_different_seed_different() {
    assert_eq!(draws(42, 200), draws(42, 200));
    assert_ne!(draws(42, 200), draws(43, 200));
    assert_ne!(draws(0, 200), draws(1, 200));
}

/// The filters written the plain way: f64, full sort of the vocabulary.
fn reference(config: &SamplingConfig, logits: &[f32], recent: &[u32]) -> Vec<f64> {
    let mut l: Vec<f64> = logits
        .iter()
        .map(|&x| {
            if x.is_nan() {
                f64::NEG_INFINITY
            } else {
                x as f64
            }
        })
        .collect();
    let start = recent.len().saturating_sub(config.repetition_window);
    let penalty = config.repetition_penalty as f64;
    for &t in &recent[start..] {
        let x = logits[t as usize] as f64;
        l[t as usize] = if x < 0.0 { x * penalty } else { x / penalty };
    }
    let t = config.temperature as f64;
    let p = softmax(&l.iter().map(|x| x / t).collect::<Vec<_>>());
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    if config.top_k > 0 {
        order.truncate(config.top_k);
    }
    if config.top_p < 1.0 {
        let mass: f64 = order.iter().map(|&i| p[i]).sum();
        let mut cumulative = 0.0;
        let mut keep = order.len();
        for (j, &i) in order.iter().enumerate() {
            cumulative += p[i] / mass;
            if cumulative >= config.top_p as f64 - 1e-6 {
                keep = j + 1;
                break;
            }
        }
        order.truncate(keep);
    }
    let max = p[order[0]];
    order.retain(|&i| p[i] >= config.min_p as f64 * max);
    let mut out = vec![0.0; p.len()];
    for &i in &order {
        out[i] = p[i];
    }
    normalised(&out)
}

fn random_logits(seed: u64, vocab: usize, scale: f64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..vocab).map(|_| (scale * rng.normal()) as f32).collect()
}

#[test]
fn real_vocabulary_matches_the_full_sort_reference() {
    let vocab = 50_280;
    let recent: Vec<u32> = (0..200u32).map(|i| (i * 7919) % vocab as u32).collect();
    let d = SamplingConfig::default;
    let configs = [
        d(),
        SamplingConfig { top_p: 0.9, ..d() },
        SamplingConfig { top_p: 0.5, ..d() },
        SamplingConfig { top_k: 40, ..d() },
        SamplingConfig {
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            temperature: 0.8,
            repetition_penalty: 1.3,
            ..d()
        },
        SamplingConfig {
            min_p: 0.1,
            temperature: 1.5,
            ..d()
        },
        SamplingConfig {
            top_p: 0.99,
            temperature: 2.0,
            ..d()
        },
    ];
    // Peaked like a trained model (scale 4) and nearly flat (scale 0.3), so
    // top-p needs a handful of tokens in one case and most of them in the other.
    for (seed, scale) in [(1u64, 4.0), (2, 0.3)] {
        let logits = random_logits(seed, vocab, scale);
        for config in &configs {
            let found = distribution(config.clone(), &logits, &recent);
            let expected = reference(config, &logits, &recent);
            let kept = found.iter().filter(|&&p| p > 0.0).count();
            let kept_expected = expected.iter().filter(|&&p| p > 0.0).count();
            assert_eq!(kept, kept_expected, "scale {scale}, {config:?}");
            for (i, (&f, &e)) in found.iter().zip(&expected).enumerate() {
                assert!(
                    (f as f64 - e).abs() <= 1e-6 + 1e-4 * e,
                    "scale {scale}, {config:?}: token {i}: {f} vs {e}"
                );
            }
            let sum: f64 = found.iter().map(|&p| p as f64).sum();
            assert!((sum - 1.0).abs() < 1e-4, "sums to {sum}");
        }
    }
}

#[test]
#[ignore = "timing; run with --ignored --nocapture"]
fn sample_time_on_a_real_vocabulary() {
    let vocab = 50_280;
    let recent: Vec<u32> = (0..64u32).map(|i| i * 13).collect();
    let d = SamplingConfig::default;
    for (name, config) in [
        ("default", d()),
        ("top_k 40", SamplingConfig { top_k: 40, ..d() }),
        ("top_p 0.9", SamplingConfig { top_p: 0.9, ..d() }),
        (
            "top_k 40 top_p 0.95 min_p 0.05 t 0.8 penalty 1.2",
            SamplingConfig {
                top_k: 40,
                top_p: 0.95,
                min_p: 0.05,
                temperature: 0.8,
                repetition_penalty: 1.2,
                ..d()
            },
        ),
        ("greedy", SamplingConfig::greedy()),
    ] {
        for (shape, scale) in [("peaked", 4.0), ("flat", 0.3)] {
            let logits = random_logits(3, vocab, scale);
            let mut sampler = Sampler::new(config.clone()).unwrap();
            let reps = 300;
            let start = std::time::Instant::now();
            for _ in 0..reps {
                std::hint::black_box(sampler.sample(&logits, &recent).unwrap());
            }
            let us = start.elapsed().as_secs_f64() * 1e6 / reps as f64;
            println!("{name:>50} {shape:>6}: {us:8.1} us per sample");
        }
    }
}

/// Padding ids (at or above the tokenizer's vocabulary) carry most of the
/// mass here; `sample_within` must never return one, must draw from the
/// distribution `distribution_within` states, and that distribution is the
/// plain softmax over the real ids when no filter runs.
#[test]
fn padding_ids_are_never_drawn_and_the_rest_follow_the_masked_softmax() {
    // ids 4 and 5 are padding and hold 70% of the probability
    let logits = logits_of(&[0.1, 0.1, 0.05, 0.05, 0.4, 0.3]);
    let vocab = 4;
    let mut sampler = Sampler::new(SamplingConfig {
        seed: 3,
        ..SamplingConfig::default()
    })
    .unwrap();
    let probs = sampler.distribution_within(&logits, &[], vocab).unwrap();
    assert_close(
        &probs,
        &[1.0 / 3.0, 1.0 / 3.0, 1.0 / 6.0, 1.0 / 6.0, 0.0, 0.0],
    );
    let n = 20_000;
    let mut counts = [0usize; 6];
    for _ in 0..n {
        counts[sampler.sample_within(&logits, &[], vocab).unwrap() as usize] += 1;
    }
    assert_eq!(counts[4] + counts[5], 0, "padding drawn: {counts:?}");
    for i in 0..vocab {
        let p = probs[i] as f64;
        let sigma = (n as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (counts[i] as f64 - n as f64 * p).abs() <= 5.0 * sigma,
            "token {i}: {counts:?} vs {probs:?}"
        );
    }
    // With filters the distribution is still a distribution over real ids.
    let filtered = Sampler::new(SamplingConfig {
        top_k: 3,
        top_p: 0.9,
        ..SamplingConfig::default()
    })
    .unwrap();
    let probs = filtered.distribution_within(&logits, &[], vocab).unwrap();
    let total: f64 = probs.iter().map(|&p| p as f64).sum();
    assert!((total - 1.0).abs() < 1e-6, "{probs:?}");
    assert_eq!(&probs[vocab..], &[0.0, 0.0]);
    // Greedy: the argmax of the real ids, not the padding id 4.
    let mut greedy = Sampler::new(SamplingConfig::greedy()).unwrap();
    assert_eq!(greedy.sample_within(&logits, &[], vocab).unwrap(), 0);
    assert_eq!(greedy.sample(&logits, &[]).unwrap(), 4);
    // A vocabulary the row cannot hold is an error, not a panic.
    assert!(greedy.sample_within(&logits, &[], 7).is_err());
    assert!(greedy.sample_within(&logits, &[], 0).is_err());
}

/// Where the first draw is a real token, the limit changes nothing: the
/// same seed gives the same token as an unlimited sampler.
#[test]
fn a_vocabulary_limit_keeps_every_draw_that_was_not_padding() {
    let logits = logits_of(&[0.3, 0.2, 0.2, 0.1, 0.2]);
    let config = SamplingConfig {
        seed: 9,
        ..SamplingConfig::default()
    };
    let (mut plain, mut limited) = (
        Sampler::new(config.clone()).unwrap(),
        Sampler::new(config).unwrap(),
    );
    let mut compared = 0;
    for _ in 0..2000 {
        let a = plain.sample(&logits, &[]).unwrap();
        if a == 4 {
            break; // the limited sampler now draws again: streams part
        }
        assert_eq!(limited.sample_within(&logits, &[], 4).unwrap(), a);
        compared += 1;
    }
    assert!(compared > 0);
}
