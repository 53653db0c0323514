//! Intervention sites: one documented vocabulary for where in the residual stream to read or
//! write. All sites are `[B, T, D]`. With L blocks:
//!
//! | spelling | meaning | HF `hidden_states` index |
//! |---|---|---|
//! | `blocks.{l}.hook_resid_pre` (l < L) | residual entering block l | l |
//! | `blocks.{l}.hook_resid_post` (l < L) | residual leaving block l | l + 1 for l < L−1; **none** for l = L−1 (HF's last entry is after the final norm) |
//! | `ln_final.hook_normalized` | output of the final RMSNorm | L |
//! | `hidden_states.{i}` (i ≤ L) | HF's `output_hidden_states[i]` | i |
//! | `block_input.{l}` | pyvene `block_input` at layer l = `hook_resid_pre` | l |
//! | `block_output.{l}` | pyvene `block_output` at layer l = `hook_resid_post` | l + 1 |
//!
//! **Off-by-one to keep in mind.** HyperDAS's "intervention layer l" is `hidden_states[l]`, the
//! residual *entering* block l, i.e. `blocks.{l}.hook_resid_pre`. The reference implements it
//! with a hook on the output of block l−1, which pyvene spells `block_output` at layer **l−1**.
//! So HyperDAS layer 15 = `blocks.15.hook_resid_pre` = `block_output.14` = `hidden_states.15`.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A residual-stream site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Site {
    /// `blocks.{l}.hook_resid_pre`.
    ResidPre(usize),
    /// `blocks.{l}.hook_resid_post`.
    ResidPost(usize),
    /// `ln_final.hook_normalized`.
    FinalNorm,
    /// `hidden_states.{i}`: resolved against the model depth by [`Site::resolve`].
    HiddenState(usize),
}

impl Site {
    /// Canonical form for a model with `n_layers` blocks: `hidden_states.{i}` becomes
    /// `hook_resid_pre` or `ln_final`; out-of-range layers are errors.
    pub fn resolve(self, n_layers: usize) -> Result<Site> {
        let out_of_range = |what: String| Error::invalid(format!("site `{self}`: {what} (the model has {n_layers} blocks)"));
        match self {
            Site::ResidPre(l) | Site::ResidPost(l) if l >= n_layers => Err(out_of_range(format!("block {l} does not exist"))),
            Site::HiddenState(i) if i > n_layers => Err(out_of_range(format!("hidden-state index {i} is above {n_layers}"))),
            Site::HiddenState(i) if i == n_layers => Ok(Site::FinalNorm),
            Site::HiddenState(i) => Ok(Site::ResidPre(i)),
            s => Ok(s),
        }
    }

    /// The HF `hidden_states` index holding this site, if any.
    pub fn hidden_state_index(self, n_layers: usize) -> Result<Option<usize>> {
        Ok(match self.resolve(n_layers)? {
            Site::ResidPre(l) => Some(l),
            Site::ResidPost(l) if l + 1 < n_layers => Some(l + 1),
            Site::ResidPost(_) => None,
            Site::FinalNorm => Some(n_layers),
            Site::HiddenState(_) => unreachable!(),
        })
    }

    /// Every spelling this parser accepts, for help texts.
    pub const SPELLINGS: &'static str = "blocks.{l}.hook_resid_pre, blocks.{l}.hook_resid_post, ln_final.hook_normalized, hidden_states.{i}, block_input.{l}, block_output.{l}";
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Site::ResidPre(l) => write!(f, "blocks.{l}.hook_resid_pre"),
            Site::ResidPost(l) => write!(f, "blocks.{l}.hook_resid_post"),
            Site::FinalNorm => write!(f, "ln_final.hook_normalized"),
            Site::HiddenState(i) => write!(f, "hidden_states.{i}"),
        }
    }
}

impl FromStr for Site {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::invalid(format!("unknown site `{s}`; expected one of {}", Site::SPELLINGS));
        let num = |x: &str| x.parse::<usize>().map_err(|_| bad());
        if s == "ln_final.hook_normalized" {
            return Ok(Site::FinalNorm);
        }
        if let Some(rest) = s.strip_prefix("blocks.") {
            let (l, hook) = rest.split_once('.').ok_or_else(bad)?;
            return match hook {
                "hook_resid_pre" => Ok(Site::ResidPre(num(l)?)),
                "hook_resid_post" => Ok(Site::ResidPost(num(l)?)),
                _ => Err(bad()),
            };
        }
        if let Some(i) = s.strip_prefix("hidden_states.") {
            return Ok(Site::HiddenState(num(i)?));
        }
        if let Some(l) = s.strip_prefix("block_input.") {
            return Ok(Site::ResidPre(num(l)?));
        }
        if let Some(l) = s.strip_prefix("block_output.") {
            return Ok(Site::ResidPost(num(l)?));
        }
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip_and_resolve() {
        for s in ["blocks.3.hook_resid_pre", "blocks.0.hook_resid_post", "ln_final.hook_normalized", "hidden_states.4"] {
            assert_eq!(s.parse::<Site>().unwrap().to_string(), s);
        }
        let l = 30;
        // HyperDAS layer 15 three ways.
        assert_eq!("block_output.14".parse::<Site>().unwrap().hidden_state_index(l).unwrap(), Some(15));
        assert_eq!("blocks.15.hook_resid_pre".parse::<Site>().unwrap().hidden_state_index(l).unwrap(), Some(15));
        assert_eq!("hidden_states.15".parse::<Site>().unwrap().resolve(l).unwrap(), Site::ResidPre(15));
        assert_eq!("hidden_states.30".parse::<Site>().unwrap().resolve(l).unwrap(), Site::FinalNorm);
        // The raw output of the last block is not among HF's hidden states.
        assert_eq!(Site::ResidPost(29).hidden_state_index(l).unwrap(), None);
        assert!(Site::ResidPre(30).resolve(l).is_err());
        assert!("hidden_states.31".parse::<Site>().unwrap().resolve(l).is_err());
        assert!("blocks.x.hook_resid_pre".parse::<Site>().is_err());
        assert!("blocks.1.hook_attn_out".parse::<Site>().is_err());
    }
}
