//! Position mixing: which base positions receive what from the source.

use candle_core::{D, Tensor};

use crate::error::{Error, Result};

/// `W [B, T_s+1, T_b]` (each column sums to 1; row `T_s` is the base position itself),
/// `source [B, T_s, D]`, `base [B, T_b, D]` → `m [B, T_b, D]`:
/// `m[b,j] = Σ_{i<T_s} W[b,i,j] source[b,i] + W[b,T_s,j] base[b,j]`.
pub fn mix_positions(w: &Tensor, source: &Tensor, base: &Tensor) -> Result<Tensor> {
    let (b, ts1, tb) = w.dims3()?;
    let (bs, ts, d) = source.dims3()?;
    let (bb, tbb, db) = base.dims3()?;
    if bs != b || bb != b || ts1 != ts + 1 || tbb != tb || db != d {
        return Err(Error::invalid(format!("mix_positions: W {:?}, source {:?}, base {:?} do not fit ([B, T_s+1, T_b], [B, T_s, D], [B, T_b, D])", w.dims(), source.dims(), base.dims())));
    }
    let from_source = w.narrow(1, 0, ts)?.transpose(1, 2)?.contiguous()?.matmul(source)?; // [B, T_b, D]
    let self_weight = w.narrow(1, ts, 1)?.transpose(1, 2)?; // [B, T_b, 1]
    Ok((from_source + base.broadcast_mul(&self_weight)?)?) // [B, T_b, D]
}

/// Column sums of `W [B, R, T_b]` → `[B, T_b]` (1 for a valid position-selection matrix).
pub fn column_sums(w: &Tensor) -> Result<Tensor> {
    Ok(w.sum(D::Minus2)?)
}
