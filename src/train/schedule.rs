//! Learning-rate schedules: linear warm-up to the peak, then a decay to `min_ratio × peak`;
//! and [`share_of`], the one rule for a length given as a share of a run.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Constant,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub peak: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub decay: Decay,
    /// Final learning rate as a fraction of the peak.
    pub min_ratio: f64,
}

impl Schedule {
    /// Learning rate for step `step` (0-based).
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let p = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let f = match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => 1.0 - p,
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        };
        self.peak * (self.min_ratio + (1.0 - self.min_ratio) * f)
    }
}

/// The number of steps in the share `ratio` of a run of `total` steps: `⌊ratio × total⌋` (a
/// negative or NaN share is 0 steps).
pub fn share_of(ratio: f64, total: usize) -> usize {
    (ratio * total as f64).floor() as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let s = Schedule { peak: 1.0, warmup_steps: 10, total_steps: 110, decay: Decay::Cosine, min_ratio: 0.1 };
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.55).abs() < 1e-12);
        assert!((s.lr(110) - 0.1).abs() < 1e-12);
        assert!((s.lr(500) - 0.1).abs() < 1e-12);
        let l = Schedule { decay: Decay::Linear, min_ratio: 0.0, ..s };
        assert!((l.lr(60) - 0.5).abs() < 1e-12);
        let c = Schedule { decay: Decay::Constant, ..s };
        assert!((c.lr(100) - 1.0).abs() < 1e-12);
    }
}
