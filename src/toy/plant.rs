//! Planting an attribute in a known subspace: interchange intervention training (IIT, Geiger et
//! al. 2022) of the toy model, so that the toy world has an answer key.
//!
//! For a base example (city `a`, attribute `x`, template `t`), a source city `b` in the same
//! template and a planted attribute `P`, let `h [D]` be the residual entering block `l` at `a`'s
//! last token and `s [D]` the same at `b`'s last token. With `P`'s fixed orthonormal basis
//! `R_P [D, k]` (the planted attributes' bases are disjoint columns of one random orthonormal
//! matrix drawn from the seed), the intervened run continues from
//!
//! ```text
//!     h' = h + R_P R_Pᵀ (s − h)
//! ```
//!
//! and is trained to answer `b`'s value when `x = P` (the swap must carry it) and `a`'s value
//! otherwise (the swap must carry nothing else, not even another planted attribute). The toy's loss is
//! `LM loss + plant_weight × interchange loss`. This is the DAS intervention at the
//! ground-truth position with a known basis: after training, the planted attribute lives in
//! `span(R)` at the city's last token, and the other attributes live outside it, even those that
//! are functions of it (a country's continent) — which a model trained on facts alone does not
//! separate (docs/hyperdas.md). HyperDAS has to find both the position and the subspace.

use candle_core::{DType, Device, Tensor};

use super::config::ToyConfig;
use super::world::Encoded;
use super::world::World;
use crate::data::collate::{LabelBatch, label_batch};
use crate::error::{Error, Result};
use crate::model::{Llama, TokenBatch};
use crate::rng::Rng;

/// The planted attributes, where and how strongly.
pub struct Plant {
    /// Indices of the attributes in the world's attributes.
    pub attributes: Vec<usize>,
    /// The residual entering this block.
    pub layer: usize,
    /// Per planted attribute, `[D, k]` orthonormal; mutually orthogonal.
    pub bases: Vec<Tensor>,
    /// `[P, D·k]`: the bases flattened, for a per-row choice.
    stacked: Tensor,
    pub weight: f64,
}

impl Plant {
    /// The plant `cfg` asks for (`None` when `plant_attributes` is empty).
    pub fn new(cfg: &ToyConfig, world: &World, device: &Device) -> Result<Option<Plant>> {
        if cfg.plant_attributes.is_empty() {
            return Ok(None);
        }
        let attributes: Vec<usize> = cfg
            .plant_attributes
            .iter()
            .map(|name| world.attributes.iter().position(|a| a == name).ok_or_else(|| Error::invalid(format!("toy setting `plant_attributes`: {name:?} is not one of {:?}", world.attributes))))
            .collect::<Result<_>>()?;
        let (d, k, n) = (cfg.hidden_size, cfg.plant_dims, attributes.len());
        let all = crate::intervention::orthonormal::random_orthonormal(d, k * n, cfg.seed ^ 0x9e37_79b9, DType::F32, device)?; // [D, P·k]
        let bases: Vec<Tensor> = (0..n).map(|i| all.narrow(1, i * k, k)?.contiguous()).collect::<candle_core::Result<_>>()?; // P × [D, k]
        let flat: Vec<Tensor> = bases.iter().map(|b| b.flatten_all()).collect::<candle_core::Result<_>>()?;
        let stacked = Tensor::stack(&flat, 0)?; // [P, D·k]
        Ok(Some(Plant { attributes, layer: cfg.plant_layer, bases, stacked, weight: cfg.plant_weight }))
    }

    /// The basis of each pair's planted attribute: `[B, D, k]`.
    fn bases_for(&self, which: &[usize]) -> Result<Tensor> {
        let (d, k) = self.bases[0].dims2()?;
        let idx = Tensor::from_vec(which.iter().map(|&w| w as u32).collect::<Vec<_>>(), which.len(), self.stacked.device())?; // [B]
        Ok(self.stacked.index_select(&idx, 0)?.reshape((which.len(), d, k))?) // [B, D, k]
    }
}

/// One interchange pair: base and source example indices, and which planted attribute (index
/// into [`Plant::attributes`]) is swapped.
pub type Pair = (usize, usize, usize);

/// `count` pairs of indices into `examples` (ordered as [`World::examples`]: template rank ×
/// `cities` + city): same template, different cities, a planted attribute drawn uniformly, half
/// of the bases asking that attribute and half asking another one. Pairs are informative where
/// possible: the answer the swap should give differs from the one it should not (for the
/// swapped attribute, the source's value differs from the base's; for the others, likewise,
/// so that keeping the base's value is a real test).
pub fn draw_pairs(rng: &mut Rng, examples: &[Encoded], cities: usize, planted: &[usize], count: usize) -> Vec<Pair> {
    let label = |i: usize| &examples[i].ids[examples[i].label_start..];
    let mut pairs = Vec::with_capacity(count);
    if cities < 2 || planted.is_empty() {
        return pairs;
    }
    let pools: Vec<(Vec<usize>, Vec<usize>)> = planted.iter().map(|&p| (0..examples.len()).partition(|&i| examples[i].attribute == p)).collect();
    for n in 0..count {
        let which = rng.below(planted.len());
        let (asks, others) = &pools[which];
        let pool = if n % 2 == 0 { asks } else { others };
        if pool.is_empty() {
            continue;
        }
        let base = pool[rng.below(pool.len())];
        let a = base % cities;
        let mut source = base;
        for _ in 0..20 {
            let b = (a + 1 + rng.below(cities - 1)) % cities; // any city but a
            source = base - a + b;
            if label(source) != label(base) {
                break;
            }
        }
        pairs.push((base, source, which));
    }
    pairs
}

/// Rows `x[b, pos[b]]` of `x [B, T, D]` → `[B, D]`.
fn rows_at(x: &Tensor, pos: &[usize]) -> Result<Tensor> {
    let p = Tensor::from_vec(pos.iter().map(|&p| p as u32).collect::<Vec<_>>(), (pos.len(), 1), x.device())?; // [B, 1]
    Ok(crate::model::llama::rows_at(x, &p)?.squeeze(1)?) // [B, D]
}

/// The intervened run of `pairs`: logits at the label positions `[B, K, V]` and the batch
/// (targets: the source's value for the planted attribute, the base's otherwise). `limit`
/// caps the label tokens scored (`Some(1)` for first-token accuracy).
pub fn interchange_logits(model: &Llama, plant: &Plant, examples: &[Encoded], pairs: &[Pair], limit: Option<usize>, pad: u32) -> Result<(Tensor, LabelBatch)> {
    let device = model.device();
    // Base prompt followed by the value it should answer after the swap.
    let seqs: Vec<Vec<u32>> = pairs
        .iter()
        .map(|&(bi, si, w)| {
            let (base, src) = (&examples[bi], &examples[si]);
            if base.attribute == plant.attributes[w] { base.ids[..base.label_start].iter().chain(&src.ids[src.label_start..]).copied().collect() } else { base.ids.clone() }
        })
        .collect();
    let with_start: Vec<(&[u32], usize)> = seqs.iter().zip(pairs).map(|(s, &(bi, _, _))| (s.as_slice(), examples[bi].label_start)).collect();
    let lb = label_batch(&with_start, limit, pad, device)?;
    let (_, t) = lb.tokens.dims();
    let base_pos: Vec<usize> = seqs.iter().zip(pairs).map(|(s, &(bi, _, _))| t - s.len() + examples[bi].entity_pos).collect();
    // The source prompts up to their label (the value is not needed to read the city).
    let src_rows: Vec<Vec<u32>> = pairs.iter().map(|&(_, si, _)| examples[si].ids[..examples[si].label_start].to_vec()).collect();
    let src_batch = TokenBatch::left_padded(&src_rows, pad, device)?;
    let (_, ts) = src_batch.dims();
    let src_pos: Vec<usize> = pairs.iter().zip(&src_rows).map(|(&(_, si, _), r)| ts - r.len() + examples[si].entity_pos).collect();
    let s = rows_at(&model.forward_to(&src_batch, plant.layer)?.0, &src_pos)?; // [B, D]
    let (x, ctx) = model.forward_to(&lb.tokens, plant.layer)?; // [B, T, D]
    let h = rows_at(&x, &base_pos)?; // [B, D]
    let which: Vec<usize> = pairs.iter().map(|&(_, _, w)| w).collect();
    let r = plant.bases_for(&which)?; // [B, D, k]
    let coords = (s - h)?.unsqueeze(1)?.matmul(&r)?; // [B, 1, k]
    let delta = coords.matmul(&r.transpose(1, 2)?)?.squeeze(1)?; // [B, D]: R_P R_Pᵀ (s − h)
    let b = pairs.len();
    let mut onehot = vec![0f32; b * t];
    for (r, &p) in base_pos.iter().enumerate() {
        onehot[r * t + p] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (b, t, 1), device)?; // [B, T, 1]
    let x = (x + onehot.broadcast_mul(&delta.unsqueeze(1)?)?)?; // [B, T, D]
    let out = model.forward_from(plant.layer, &x, &ctx)?; // [B, T, D]
    Ok((model.logits_at(&out, &lb.positions)?, lb)) // [B, K, V]
}

/// First-token accuracy of the intervened run, per planted attribute (in [`Plant::attributes`]
/// order): (cause: pairs asking the swapped attribute answer the source's value; isolate: the
/// others keep the base's value).
pub fn interchange_accuracy(model: &Llama, plant: &Plant, examples: &[Encoded], pairs: &[Pair], pad: u32) -> Result<Vec<(f64, f64)>> {
    let n = plant.attributes.len();
    let (mut hit, mut all) = (vec![[0usize; 2]; n], vec![[0usize; 2]; n]);
    for chunk in pairs.chunks(128) {
        let (logits, lb) = interchange_logits(model, plant, examples, chunk, Some(1), pad)?;
        let pred = logits.argmax(candle_core::D::Minus1)?.flatten_all()?.to_vec1::<u32>()?; // [B]
        for ((&(bi, _, w), p), t) in chunk.iter().zip(pred).zip(lb.targets) {
            let kind = usize::from(examples[bi].attribute != plant.attributes[w]);
            all[w][kind] += 1;
            hit[w][kind] += usize::from(p == t);
        }
    }
    let rate = |w: usize, k: usize| if all[w][k] == 0 { 0.0 } else { hit[w][k] as f64 / all[w][k] as f64 };
    Ok((0..n).map(|w| (rate(w, 0), rate(w, 1))).collect())
}
