//! The learning-rate schedule: linear warm-up to the peak, then cosine
//! decay to a minimum (docs/DESIGN.md §11.3).

/// Learning rate of step `s` (0-based) out of `total_steps`:
/// ```text
/// s < W:   peak · (s + 1) / W                                  (reaches peak at s = W − 1)
/// s ≥ W:   min + (peak − min) · (1 + cos(π · (s − W + 1) / (T − W))) / 2   (reaches min at s = T − 1)
/// ```
/// W = warm-up steps, T = total steps; steps past the end stay at min.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LrSchedule {
    pub peak: f64,
    pub min: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
}

impl LrSchedule {
    pub fn lr(&self, step: usize) -> f64 {
        let (w, t) = (self.warmup_steps, self.total_steps);
        if step < w {
            return self.peak * (step + 1) as f64 / w as f64;
        }
        if step + 1 >= t {
            return self.min;
        }
        let progress = (step + 1 - w) as f64 / (t - w) as f64;
        self.min + (self.peak - self.min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}
