//! Shared helpers of the integration tests: random inputs and comparisons.
#![allow(dead_code)]

use selective::kernels::{ScanInputs, ScanShape};
use selective::rng::Rng;
use selective::Float;

/// Owned random inputs of a selective scan, shaped like a Mamba layer's:
/// raw delta around the inverse softplus of 0.01..0.5, A negative.
pub struct ScanCase<T> {
    pub shape: ScanShape,
    pub u: Vec<T>,
    pub delta: Vec<T>,
    pub a: Vec<T>,
    pub b: Vec<T>,
    pub c: Vec<T>,
    pub d: Option<Vec<T>>,
    pub z: Option<Vec<T>>,
    pub delta_bias: Option<Vec<T>>,
    pub initial_state: Option<Vec<T>>,
}

#[derive(Clone, Copy, Debug)]
pub struct Extras {
    pub d: bool,
    pub z: bool,
    pub bias: bool,
    pub initial_state: bool,
}

pub const ALL: Extras = Extras {
    d: true,
    z: true,
    bias: true,
    initial_state: true,
};
pub const NONE: Extras = Extras {
    d: false,
    z: false,
    bias: false,
    initial_state: false,
};

impl<T: Float> ScanCase<T> {
    pub fn random(shape: ScanShape, extras: Extras, seed: u64) -> Self {
        let mut r = Rng::new(seed);
        let act = shape.batch * shape.len * shape.channels;
        let tok = shape.batch * shape.len * shape.state;
        Self {
            shape,
            u: r.vec(act, |r| r.normal()),
            delta: r.vec(act, |r| r.uniform_in(-3.0, 0.5)),
            a: r.vec(shape.channels * shape.state, |r| -(r.normal() * 0.5).exp()),
            b: r.vec(tok, |r| r.normal()),
            c: r.vec(tok, |r| r.normal()),
            d: extras.d.then(|| r.vec(shape.channels, |r| r.normal())),
            z: extras.z.then(|| r.vec(act, |r| r.normal())),
            delta_bias: extras
                .bias
                .then(|| r.vec(shape.channels, |r| r.normal() * 0.5)),
            initial_state: extras
                .initial_state
                .then(|| r.vec(shape.batch * shape.channels * shape.state, |r| r.normal())),
        }
    }

    /// For scans without softplus: Δ must be positive, so map delta to
    /// softplus(delta) and the bias to a small positive offset.
    pub fn with_positive_delta(mut self) -> Self {
        for v in self.delta.iter_mut() {
            *v = v.softplus();
        }
        if let Some(bias) = self.delta_bias.as_mut() {
            for v in bias.iter_mut() {
                *v = v.abs() * T::from_f64(0.1);
            }
        }
        self
    }

    /// Random case whose Δ suits the options (positive when no softplus).
    pub fn random_for(shape: ScanShape, extras: Extras, seed: u64, softplus: bool) -> Self {
        let case = Self::random(shape, extras, seed);
        if softplus {
            case
        } else {
            case.with_positive_delta()
        }
    }

    pub fn inputs(&self) -> ScanInputs<'_, T> {
        ScanInputs {
            u: &self.u,
            delta: &self.delta,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: self.d.as_deref(),
            z: self.z.as_deref(),
            delta_bias: self.delta_bias.as_deref(),
            initial_state: self.initial_state.as_deref(),
        }
    }
}

/// Largest |a - b| / (atol + rtol |b|) over the elements; <= 1 passes.
pub fn assert_close<T: Float, U: Float>(what: &str, got: &[T], want: &[U], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst = 0.0f64;
    let mut at = 0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (g, w) = (g.to_f64(), w.to_f64());
        let e = (g - w).abs() / (atol + rtol * w.abs());
        if !(e <= worst) {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= 1.0,
        "{what}: element {at}: got {} want {} (error {worst:.3} x tolerance atol {atol} rtol {rtol})",
        got[at],
        want[at]
    );
}

pub fn random_vec<T: Float>(len: usize, seed: u64) -> Vec<T> {
    let mut r = Rng::new(seed);
    r.vec(len, |r| r.normal())
}

pub fn dot<T: Float>(a: &[T], b: &[T]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x.to_f64() * y.to_f64()).sum()
}

pub fn models_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/models")
}

/// Every tensor of a reference file as (shape, values in f64).
pub fn read_reference(dir: &str) -> std::collections::HashMap<String, (Vec<usize>, Vec<f64>)> {
    read_reference_file(dir, "reference.safetensors")
}

/// Every tensor of `file` in fixture directory `dir`, as (shape, f64 values).
#[allow(dead_code)]
pub fn read_reference_file(
    dir: &str,
    file: &str,
) -> std::collections::HashMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(models_dir().join(dir).join(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F64 => data
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I64 => data
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("unexpected dtype {other:?}"),
            };
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

pub fn ids_of(
    r: &std::collections::HashMap<String, (Vec<usize>, Vec<f64>)>,
    key: &str,
) -> (Vec<u32>, usize, usize) {
    let (shape, v) = &r[key];
    (v.iter().map(|&x| x as u32).collect(), shape[0], shape[1])
}

/// Checks every gradient of `model` (f64) against central differences of
/// the mean next-token cross-entropy on a fixed batch of 2 × 7 ids
/// (relative error 1e-5, absolute 1e-7); `label` names the case in failures.
pub fn assert_gradients_match_finite_differences(
    model: &mut selective::nn::Mamba<f64>,
    label: &str,
) {
    use selective::nn::{next_token_cross_entropy, Mamba};
    let c = model.config.clone();
    let v = c.vocab_size;
    let (batch, len) = (2, 7);
    let ids: Vec<u32> = (0..batch * len).map(|i| ((i * 7 + 3) % v) as u32).collect();
    let loss_of = |m: &Mamba<f64>| {
        let logits = m.forward(&ids, batch, len).unwrap();
        next_token_cross_entropy(&logits, &ids, batch, len, v)
            .unwrap()
            .0
    };
    let (logits, cache) = model.forward_train(&ids, batch, len).unwrap();
    let (_, d_logits) = next_token_cross_entropy(&logits, &ids, batch, len, v).unwrap();
    let grads = model.backward(&ids, &cache, &d_logits).unwrap();
    let analytic: Vec<(String, Vec<f64>)> = grads
        .tensors(&c)
        .into_iter()
        .map(|(i, g)| (i.name, g.clone()))
        .collect();
    let eps = 1e-6;
    for (name, g) in analytic {
        let nudge = |m: &mut Mamba<f64>, i: usize, delta: f64| {
            let mut ts = m.params.tensors_mut(&c);
            ts.iter_mut().find(|(info, _)| info.name == name).unwrap().1[i] += delta;
        };
        let mut fd = vec![0.0; g.len()];
        for (i, fd_i) in fd.iter_mut().enumerate() {
            nudge(model, i, eps);
            let lp = loss_of(model);
            nudge(model, i, -2.0 * eps);
            let lm = loss_of(model);
            nudge(model, i, eps);
            *fd_i = (lp - lm) / (2.0 * eps);
        }
        assert_close(&format!("FD {name} ({label})"), &g, &fd, 1e-7, 1e-5);
    }
}

/// A fresh, empty directory `selective-{group}-{pid}-{name}` under the
/// system's temporary directory.
pub fn fresh_temp_dir(group: &str, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("selective-{group}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `dir/text.txt`: a pangram `repeats` times, a small repetitive text for
/// training runs.
pub fn write_pangram_text(dir: &std::path::Path, repeats: usize) -> std::path::PathBuf {
    let path = dir.join("text.txt");
    let line = "the quick brown fox jumps over the lazy dog. ";
    std::fs::write(&path, line.repeat(repeats)).unwrap();
    path
}
