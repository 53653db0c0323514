//! Planting an attribute in a known subspace: interchange intervention training (IIT, Geiger et
//! al. 2022) of the toy model, so that the toy world has an answer key.
//!
//! For a base example (city `a`, attribute `x`, template `t`) and a source city `b` in the same
//! template, let `h [D]` be the residual entering block `l` at `a`'s last token and `s [D]` the
//! same at `b`'s last token. With a fixed orthonormal basis `R [D, k]` drawn from the seed, the
//! intervened run continues from
//!
//! ```text
//!     h' = h + R Rᵀ (s − h)
//! ```
//!
//! and is trained to answer `b`'s value when `x` is the planted attribute (the swap must carry it)
//! and `a`'s value otherwise (the swap must carry nothing else). The toy's loss is
//! `LM loss + plant_weight × interchange loss`. This is the DAS intervention at the
//! ground-truth position with a known basis: after training, the planted attribute lives in
//! `span(R)` at the city's last token, and the other attributes live outside it, even those that
//! are functions of it (a country's continent) — which a model trained on facts alone does not
//! separate (docs/hyperdas.md). HyperDAS has to find both the position and the subspace.

use candle_core::{DType, Device, Tensor};

use super::train::{Encoded, ToyConfig};
use super::world::World;
use crate::data::collate::{LabelBatch, label_batch};
use crate::error::{Error, Result};
use crate::model::{Llama, TokenBatch};
use crate::rng::Rng;

/// The planted attribute, where and how strongly.
pub struct Plant {
    /// Index of the attribute in the world's attributes.
    pub attribute: usize,
    /// The residual entering this block.
    pub layer: usize,
    /// `[D, k]` orthonormal.
    pub basis: Tensor,
    pub weight: f64,
}

impl Plant {
    /// The plant `cfg` asks for (`None` when `plant_attribute` is empty).
    pub fn new(cfg: &ToyConfig, world: &World, device: &Device) -> Result<Option<Plant>> {
        if cfg.plant_attribute.is_empty() {
            return Ok(None);
        }
        let attribute = world
            .attributes
            .iter()
            .position(|a| *a == cfg.plant_attribute)
            .ok_or_else(|| Error::invalid(format!("toy setting `plant_attribute`: {:?} is not one of {:?}", cfg.plant_attribute, world.attributes)))?;
        let basis = crate::intervention::orthonormal::random_orthonormal(cfg.hidden_size, cfg.plant_dims, cfg.seed ^ 0x9e37_79b9, DType::F32, device)?; // [D, k]
        Ok(Some(Plant { attribute, layer: cfg.plant_layer, basis, weight: cfg.plant_weight }))
    }
}

/// `count` (base, source) pairs of indices into `examples` (ordered as
/// [`World::examples`]: template rank × `cities` + city): same template, different cities,
/// half of them asking the planted attribute. Pairs are informative where possible: the
/// answer the swap should give differs from the one it should not (for the planted attribute,
/// the source's value differs from the base's; for the others, likewise, so that keeping the
/// base's value is a real test).
pub fn draw_pairs(rng: &mut Rng, examples: &[Encoded], cities: usize, planted: usize, count: usize) -> Vec<(usize, usize)> {
    let (asks, others): (Vec<usize>, Vec<usize>) = (0..examples.len()).partition(|&i| examples[i].attribute == planted);
    let label = |i: usize| &examples[i].ids[examples[i].label_start..];
    let mut pairs = Vec::with_capacity(count);
    if cities < 2 || asks.is_empty() || others.is_empty() {
        return pairs;
    }
    for n in 0..count {
        let pool = if n % 2 == 0 { &asks } else { &others };
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
        pairs.push((base, source));
    }
    pairs
}

/// Embed and run blocks `0..l`: the residual entering block `l` `[B, T, D]`.
fn run_to(model: &Llama, batch: &TokenBatch, l: usize) -> Result<Tensor> {
    let ctx = model.context(batch)?;
    let mut x = model.embed(&batch.input_ids)?; // [B, T, D]
    for i in 0..l {
        x = model.block(i, &x, &ctx)?; // [B, T, D]
    }
    Ok(x)
}

/// Rows `x[b, pos[b]]` of `x [B, T, D]` → `[B, D]` (differentiable: index_select).
fn rows_at(x: &Tensor, pos: &[usize]) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let idx: Vec<u32> = pos.iter().enumerate().map(|(r, &p)| (r * t + p) as u32).collect();
    let idx = Tensor::from_vec(idx, b, x.device())?; // [B]
    Ok(x.reshape((b * t, d))?.index_select(&idx, 0)?) // [B, D]
}

/// The intervened run of `pairs`: logits at the label positions `[B, K, V]` and the batch
/// (targets: the source's value for the planted attribute, the base's otherwise). `limit`
/// caps the label tokens scored (`Some(1)` for first-token accuracy).
pub fn interchange_logits(model: &Llama, plant: &Plant, examples: &[Encoded], pairs: &[(usize, usize)], limit: Option<usize>, pad: u32) -> Result<(Tensor, LabelBatch)> {
    let device = model.device();
    // Base prompt followed by the value it should answer after the swap.
    let seqs: Vec<Vec<u32>> = pairs
        .iter()
        .map(|&(bi, si)| {
            let (base, src) = (&examples[bi], &examples[si]);
            if base.attribute == plant.attribute {
                base.ids[..base.label_start].iter().chain(&src.ids[src.label_start..]).copied().collect()
            } else {
                base.ids.clone()
            }
        })
        .collect();
    let with_start: Vec<(&[u32], usize)> = seqs.iter().zip(pairs).map(|(s, &(bi, _))| (s.as_slice(), examples[bi].label_start)).collect();
    let lb = label_batch(&with_start, limit, pad, device)?;
    let (_, t) = lb.tokens.dims();
    let base_pos: Vec<usize> = seqs.iter().zip(pairs).map(|(s, &(bi, _))| t - s.len() + examples[bi].entity_pos).collect();
    // The source prompts up to their label (the value is not needed to read the city).
    let src_rows: Vec<Vec<u32>> = pairs.iter().map(|&(_, si)| examples[si].ids[..examples[si].label_start].to_vec()).collect();
    let src_batch = TokenBatch::left_padded(&src_rows, pad, device)?;
    let (_, ts) = src_batch.dims();
    let src_pos: Vec<usize> = pairs.iter().zip(&src_rows).map(|(&(_, si), r)| ts - r.len() + examples[si].entity_pos).collect();
    let s = rows_at(&run_to(model, &src_batch, plant.layer)?, &src_pos)?; // [B, D]
    let x = run_to(model, &lb.tokens, plant.layer)?; // [B, T, D]
    let h = rows_at(&x, &base_pos)?; // [B, D]
    let delta = (s - h)?.matmul(&plant.basis)?.matmul(&plant.basis.t()?)?; // [B, D]: R Rᵀ (s − h)
    let b = pairs.len();
    let mut onehot = vec![0f32; b * t];
    for (r, &p) in base_pos.iter().enumerate() {
        onehot[r * t + p] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (b, t, 1), device)?; // [B, T, 1]
    let x = (x + onehot.broadcast_mul(&delta.unsqueeze(1)?)?)?; // [B, T, D]
    let ctx = model.context(&lb.tokens)?;
    let out = model.forward_from(plant.layer, &x, &ctx)?; // [B, T, D]
    Ok((model.logits_at(&out, &lb.positions)?, lb)) // [B, K, V]
}

/// First-token accuracy of the intervened run: (cause: pairs asking the planted attribute
/// answer the source's value; isolate: the others keep the base's value).
pub fn interchange_accuracy(model: &Llama, plant: &Plant, examples: &[Encoded], pairs: &[(usize, usize)], pad: u32) -> Result<(f64, f64)> {
    let (mut hit, mut all) = ([0usize; 2], [0usize; 2]);
    for chunk in pairs.chunks(128) {
        let (logits, lb) = interchange_logits(model, plant, examples, chunk, Some(1), pad)?;
        let pred = logits.argmax(candle_core::D::Minus1)?.flatten_all()?.to_vec1::<u32>()?; // [B]
        for ((&(bi, _), p), t) in chunk.iter().zip(pred).zip(lb.targets) {
            let kind = usize::from(examples[bi].attribute != plant.attribute);
            all[kind] += 1;
            hit[kind] += usize::from(p == t);
        }
    }
    let rate = |k: usize| if all[k] == 0 { 0.0 } else { hit[k] as f64 / all[k] as f64 };
    Ok((rate(0), rate(1)))
}
