//! A cache of the frozen target's clean hidden states per prompt.
//!
//! HyperDAS reads every hidden state `[T, L+1, D]` of each base and source prompt, and the
//! target never changes during a run, so a prompt seen once (the same template and entity recur
//! across rows, and every row recurs each epoch) need not be run again. Misses of a batch are
//! computed together in one clean pass; the batch is then assembled from the cache, left-padded
//! with zeros.
//!
//! Exactness: the cache holds *canonical* states: every prompt is computed in a fixed group of
//! prompts decided before training (the run's unique prompts sorted by length, then by ids, in
//! groups of [`GROUP`]), never in whatever batch first needs it. A prompt's cached states
//! therefore depend only on the datasets, not on the data order, the batch size or which
//! prompts were cached before, so a run resumed with an empty cache continues bit for bit
//! (tests/cli.rs). Cached states can differ from the ones the same prompt gets inside a
//! training batch in the last bits (a matmul's rounding can depend on the number of rows it is
//! computed with), which changes results only at float tolerance; nothing reads states at
//! padded positions (their keys are masked, their "self" weight is 1 and their outputs reach
//! no real token), so zero padding is exact. Length-sorted groups also pad less than random
//! batches do. Prompts that were not registered are computed alone (also canonical).
//! `f16` / `bf16` entries halve the memory at the cost of rounding the states.
//!
//! Policy: the budget goes to the prompts used most. Before the first pass the registered
//! prompts are ranked by how many registered rows use them (then shorter first, then by ids)
//! and taken while their states fit the budget: those are *cacheable*, and only they form
//! canonical groups. A cacheable prompt is computed with its group once and kept. A registered
//! prompt that does not fit is computed together with the batch's other such prompts whenever it
//! is needed, and not kept (deterministic given the batch, so a resumed run, which replays the
//! same batches and makes the same plan, still continues bit for bit). A prompt registered after
//! the plan was made, or never, is computed alone and kept while budget remains. (Before,
//! every missed prompt computed its whole group of [`GROUP`]; with more distinct prompts than
//! the budget holds, as in the paper's data regime, that ran the target up to 16 times per
//! needed prompt.) The hit rate is reported.

use std::collections::HashMap;

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::model::{Llama, TokenBatch};

/// Hits, misses and size of a [`StateCache`].
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    /// Prompts run through the target (a miss computes its whole canonical group).
    pub computed: u64,
    pub entries: usize,
    pub bytes: usize,
}

impl CacheStats {
    /// Share of prompt look-ups served from the cache.
    pub fn hit_rate(&self) -> f64 {
        let n = self.hits + self.misses;
        if n == 0 { 0.0 } else { self.hits as f64 / n as f64 }
    }
}

/// Prompts per canonical group.
pub const GROUP: usize = 16;

/// Clean hidden states per prompt (token ids, start token included), under a byte budget.
pub struct StateCache {
    budget: usize,
    dtype: DType,
    map: HashMap<Vec<u32>, Tensor>,
    /// Registered prompts and how many registered rows use each.
    uses: HashMap<Vec<u32>, usize>,
    /// The new prompts of each `register` call, in call order.
    registered: Vec<Vec<Vec<u32>>>,
    /// The plan (made at the first pass): each cacheable prompt's group.
    group_of: HashMap<Vec<u32>, usize>,
    groups: Vec<Vec<Vec<u32>>>,
    planned: bool,
    /// Bytes the plan reserves for cacheable prompts.
    reserved: usize,
    /// Bytes of prompts kept outside the plan.
    extra: usize,
    stats: CacheStats,
}

impl StateCache {
    /// A cache of at most `budget_bytes`, storing entries as `dtype` (f32, f16 or bf16).
    pub fn new(budget_bytes: usize, dtype: DType) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
            return Err(Error::invalid(format!("state cache dtype {dtype:?}: use f32, f16 or bf16")));
        }
        Ok(StateCache {
            budget: budget_bytes,
            dtype,
            map: HashMap::new(),
            uses: HashMap::new(),
            registered: Vec::new(),
            group_of: HashMap::new(),
            groups: Vec::new(),
            planned: false,
            reserved: 0,
            extra: 0,
            stats: CacheStats::default(),
        })
    }

    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    /// Register prompts (token ids with the start token) that will be asked for, once per row
    /// that uses them (the count ranks them for the budget). Register every dataset of a run,
    /// in a fixed order, before its first step.
    pub fn register<'a>(&mut self, prompts: impl IntoIterator<Item = &'a [u32]>) {
        if self.planned {
            return; // the plan is made: later prompts are treated as unregistered
        }
        let mut fresh = Vec::new();
        for p in prompts {
            match self.uses.get_mut(p) {
                Some(n) => *n += 1,
                None => {
                    self.uses.insert(p.to_vec(), 1);
                    fresh.push(p.to_vec());
                }
            }
        }
        self.registered.push(fresh);
    }

    /// Choose the cacheable prompts (most used first, then shorter, then by ids, while they fit
    /// at `bytes_per_token`) and group them canonically: per `register` call, by length, then
    /// ids, [`GROUP`] a group (when everything fits, the groups are those of the calls alone).
    fn plan(&mut self, bytes_per_token: usize) {
        let mut ranked: Vec<&Vec<u32>> = self.registered.iter().flatten().collect();
        ranked.sort_by(|a, b| self.uses[*b].cmp(&self.uses[*a]).then_with(|| a.len().cmp(&b.len())).then_with(|| a.cmp(b)));
        let mut chosen: std::collections::HashSet<&Vec<u32>> = std::collections::HashSet::new();
        for p in ranked {
            let bytes = p.len() * bytes_per_token;
            if self.reserved + bytes <= self.budget {
                self.reserved += bytes;
                chosen.insert(p);
            }
        }
        let mut groups = Vec::new();
        for call in &self.registered {
            let mut kept: Vec<Vec<u32>> = call.iter().filter(|p| chosen.contains(p)).cloned().collect();
            kept.sort_by(|a, b| a.len().cmp(&b.len()).then_with(|| a.cmp(b)));
            groups.extend(kept.chunks(GROUP).map(|c| c.to_vec()));
        }
        for (g, chunk) in groups.iter().enumerate() {
            for p in chunk {
                self.group_of.insert(p.clone(), g);
            }
        }
        self.groups = groups;
        self.planned = true;
    }

    /// States `[len, L+1, D]` of `prompts`: a cacheable prompt with its whole group (canonical),
    /// the registered ones that do not fit together, and the others alone.
    fn compute(&mut self, target: &Llama, prompts: &[&Vec<u32>]) -> Result<HashMap<Vec<u32>, Tensor>> {
        let mut todo: Vec<Vec<Vec<u32>>> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut uncacheable: Vec<Vec<u32>> = Vec::new();
        for p in prompts {
            match self.group_of.get(*p) {
                Some(&g) => {
                    if seen.insert(g) {
                        todo.push(self.groups[g].clone());
                    }
                }
                None if self.uses.contains_key(*p) => uncacheable.push(p.to_vec()),
                None => todo.push(vec![p.to_vec()]), // unregistered: alone
            }
        }
        if !uncacheable.is_empty() {
            todo.push(uncacheable);
        }
        let mut out = HashMap::new();
        for group in todo {
            self.stats.computed += group.len() as u64;
            let batch = TokenBatch::left_padded(&group, 0, target.device())?; // the pad id is never read
            let all = target.forward_hidden(&batch, None)?.stacked.ok_or_else(|| Error::invalid("no hidden states"))?; // [G, Tg, L+1, D]
            let tg = batch.dims().1;
            for (i, p) in group.into_iter().enumerate() {
                let states = all.narrow(0, i, 1)?.squeeze(0)?.narrow(0, tg - p.len(), p.len())?.contiguous()?; // [len, L+1, D]
                out.insert(p, states);
            }
        }
        Ok(out)
    }

    /// Every hidden state `[B, T, L+1, D]` of a padded batch, zeros at padded positions, in the
    /// target's dtype.
    pub fn states(&mut self, target: &Llama, batch: &TokenBatch) -> Result<Tensor> {
        let (b, t) = batch.dims();
        let (ids, mask) = (batch.ids(), batch.mask());
        let rows: Vec<Vec<u32>> = ids.chunks(t).zip(mask.chunks(t)).map(|(r, m)| r.iter().zip(m).filter(|(_, m)| **m == 1).map(|(&id, _)| id).collect()).collect();
        let mut missing: Vec<Vec<u32>> = Vec::new();
        for r in &rows {
            if self.map.contains_key(r) {
                self.stats.hits += 1;
            } else {
                self.stats.misses += 1;
                missing.push(r.clone());
            }
        }
        if !self.planned {
            self.plan((target.num_layers() + 1) * target.hidden_size() * self.dtype.size_in_bytes());
        }
        let fresh = if missing.is_empty() { HashMap::new() } else { self.compute(target, &missing.iter().collect::<Vec<_>>())? };
        for (p, states) in &fresh {
            if self.map.contains_key(p) {
                continue;
            }
            let stored = states.to_dtype(self.dtype)?.contiguous()?;
            let bytes = stored.elem_count() * stored.dtype().size_in_bytes();
            let keep = if self.group_of.contains_key(p) {
                true // reserved by the plan
            } else if !self.uses.contains_key(p) && self.reserved + self.extra + bytes <= self.budget {
                self.extra += bytes; // outside the plan, while budget remains
                true
            } else {
                false
            };
            if keep {
                self.stats.bytes += bytes;
                self.map.insert(p.clone(), stored);
                self.stats.entries = self.map.len();
            }
        }
        let mut parts = Vec::with_capacity(b);
        for r in &rows {
            let states = match self.map.get(r) {
                Some(s) => s.to_dtype(target.dtype())?,
                None => fresh.get(r).ok_or_else(|| Error::invalid("state cache: a prompt was not computed"))?.clone(),
            }; // [len, L+1, D]
            let (len, l1, d) = states.dims3()?;
            parts.push(if len < t { Tensor::cat(&[&Tensor::zeros((t - len, l1, d), states.dtype(), states.device())?, &states], 0)? } else { states });
        }
        Ok(Tensor::stack(&parts, 0)?) // [B, T, L+1, D]
    }
}
