//! The frozen target as an intervention method sees it: clean states, and the rest of the
//! pass from an edited residual. Every method (HyperDAS, DAS, MDAS) reaches the model through
//! these calls only (shapes: B batch, T tokens, L blocks, D hidden, K label positions, V vocab):
//!
//! | call | gives |
//! |---|---|
//! | [`Target::clean`] | the clean residual stream `[B, T, L+1, D]` of a prompt batch (index l = `blocks.{l}.hook_resid_pre`), detached; from the state cache when there is one |
//! | [`Target::clean_at`] | the clean residual at one site, `[B, T, D]`, detached; without a cache only blocks `0..l` run |
//! | [`Target::context`] | the attention masks and RoPE tables of a batch, shared by every block |
//! | [`Target::run_from`] | blocks `l..L` from an edited residual at `blocks.{l}.hook_resid_pre`, then the logits at `positions [B, K]`: `[B, K, V]` (the taped pass, [`Llama::logits_from`]) |
//!
//! The cache ([`StateCache`]) is optional and invisible in the results: with it in f32,
//! `clean` returns bitwise the same states as a fresh pass.

use candle_core::Tensor;

use super::batch::{ForwardContext, TokenBatch};
use super::cache::StateCache;
use super::kernels::with_frozen_bf16;
use super::llama::Llama;
use super::site::Site;
use crate::error::{Error, Result};

/// A frozen model, with the clean-state cache when there is one.
pub struct Target<'a> {
    pub model: &'a Llama,
    cache: Option<&'a mut StateCache>,
}

impl<'a> Target<'a> {
    pub fn new(model: &'a Llama, cache: Option<&'a mut StateCache>) -> Self {
        Target { model, cache }
    }

    /// The clean residual stream at every site, `[B, T, L+1, D]`, detached.
    pub fn clean(&mut self, batch: &TokenBatch) -> Result<Tensor> {
        let (model, cache) = (self.model, self.cache.as_deref_mut());
        let states = with_frozen_bf16(model.clean_bf16(), || match cache {
            Some(c) => c.states(model, batch),                                                                    // [B, T, L+1, D]
            None => model.forward_hidden(batch, None)?.stacked.ok_or_else(|| Error::invalid("no hidden states")), // [B, T, L+1, D]
        })?;
        Ok(states.detach())
    }

    /// The clean residual at `site` (a residual entering or leaving a block), `[B, T, D]`,
    /// detached. Without a cache only the blocks before it run.
    pub fn clean_at(&mut self, batch: &TokenBatch, site: Site) -> Result<Tensor> {
        let l = self.resid_index(site)?;
        let (model, cache) = (self.model, self.cache.as_deref_mut());
        let h = with_frozen_bf16(model.clean_bf16(), || -> Result<Tensor> {
            Ok(match cache {
                Some(c) => c.states(model, batch)?.narrow(2, l, 1)?.squeeze(2)?, // [B, T, D]
                None => model.forward_to(batch, l)?.0,                           // [B, T, D]
            })
        })?;
        Ok(h.detach())
    }

    /// The masks and RoPE tables of `batch`.
    pub fn context(&self, batch: &TokenBatch) -> Result<ForwardContext> {
        self.model.context(batch)
    }

    /// Blocks `l..L` from `resid [B, T, D]` entering the block of `site`, then the final norm and
    /// the logits at `positions [B, K]`: `[B, K, V]`.
    pub fn run_from(&self, site: Site, resid: &Tensor, ctx: &ForwardContext, positions: &Tensor) -> Result<Tensor> {
        let l = self.resid_index(site)?;
        if l >= self.model.num_layers() {
            return Err(Error::invalid(format!("site {site}: no block runs after it (the target has {} blocks)", self.model.num_layers())));
        }
        self.model.logits_from(l, resid, ctx, positions) // [B, K, V]
    }

    /// The `hidden_states` index of a residual-stream site.
    fn resid_index(&self, site: Site) -> Result<usize> {
        let n = self.model.num_layers();
        match site.resolve(n)? {
            Site::ResidPre(l) => Ok(l),
            Site::ResidPost(l) if l + 1 < n => Ok(l + 1),
            s => Err(Error::invalid(format!("site {s}: not a residual entering a block (use blocks.{{l}}.hook_resid_pre, l < {n})"))),
        }
    }
}
