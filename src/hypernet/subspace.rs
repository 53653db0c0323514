//! The subspace module of HyperDAS (hyperdas-method.md §4): its parameters, registered under
//! `subspace.*`, and how it turns `(h, m, z)` into the intervened residual with the pure
//! functions of [`crate::intervention::subspace`].
//!
//! | kind | parameters | new vector |
//! |---|---|---|
//! | `reflect_select` (default) | `R [D, k]`, RMSNorm + SwiGLU `D → F → D` | `u = g(norm(z))/‖·‖`, `W = (I − 2uuᵀ)R`, `h + WWᵀ(m − h)` |
//! | `das` | `R [D, k]` | `h + RRᵀ(m − h)` |
//! | `mask_select` | `R [D, k]`, RMSNorm + SwiGLU `D → F → k` | `h + R diag(σ(g(norm(z))/T)) Rᵀ (m − h)` |
//! | `boundless` | `R [D, D]`, boundary β (init 0.5) | `h + R diag(σ((βD − i)/T)) Rᵀ (m − h)` |
//! | `none` | — | `m` |
//!
//! F is the target's MLP width (the reference hard-codes Llama-3-8B's 14336 for every model).
//! `R` is orthonormal at initialisation (seeded QR) and after every optimizer step
//! ([`SubspaceModule::retract`]).

use candle_core::{DType, Tensor, Var};

use super::Registrar;
use crate::error::{Error, Result};
use crate::intervention::orthonormal::{random_orthonormal, retract};
use crate::intervention::subspace::{boundary_mask, das, full, masked_rotation, reflect_select, unit_last_dim};
use crate::model::llama::{Linear, Mlp, RmsNorm};

/// Which subspace module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubspaceKind {
    ReflectSelect,
    Das,
    MaskSelect,
    Boundless,
    None,
}

impl SubspaceKind {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "reflect_select" | "ReflectSelect" => SubspaceKind::ReflectSelect,
            "das" | "DAS" => SubspaceKind::Das,
            "mask_select" | "MaskSelect" => SubspaceKind::MaskSelect,
            "boundless" | "BoundlessDAS" => SubspaceKind::Boundless,
            "none" | "None" => SubspaceKind::None,
            _ => return Err(Error::invalid(format!("unknown subspace module `{s}`; valid: reflect_select, das, mask_select, boundless, none"))),
        })
    }

    /// The configuration spelling ([`SubspaceKind::parse`] reads it back).
    pub fn name(self) -> &'static str {
        match self {
            SubspaceKind::ReflectSelect => "reflect_select",
            SubspaceKind::Das => "das",
            SubspaceKind::MaskSelect => "mask_select",
            SubspaceKind::Boundless => "boundless",
            SubspaceKind::None => "none",
        }
    }
}

/// The module and its parameters.
pub struct SubspaceModule {
    pub kind: SubspaceKind,
    /// `[D, k]` (`[D, D]` for boundless); absent for `none`.
    pub rotation: Option<Var>,
    /// Conditioning on the hypernetwork state (reflect_select, mask_select).
    pub norm: Option<RmsNorm>,
    pub mlp: Option<Mlp>,
    /// Boundless DAS's boundary β ∈ [0, 1] (clamped at use).
    pub boundary: Option<Var>,
    /// Mask temperature (mask_select, boundless), set by the schedule each step.
    pub temperature: f64,
}

impl SubspaceModule {
    /// Register the module's parameters. `d` hidden size, `f` MLP width, `k` rank.
    pub(crate) fn new(r: &mut Registrar, kind: SubspaceKind, d: usize, f: usize, k: usize, seed: u64, eps: f64) -> Result<Self> {
        if kind != SubspaceKind::None && kind != SubspaceKind::Boundless && (k == 0 || k > d) {
            return Err(Error::invalid(format!("subspace rank k must be in 1..={d}, got {k}")));
        }
        let dev = r.device.clone();
        let mut rotation = None;
        if kind != SubspaceKind::None {
            let cols = if kind == SubspaceKind::Boundless { d } else { k };
            let init = random_orthonormal(d, cols, seed, DType::F32, &dev)?;
            r.copy("subspace.rotation", &init)?;
            rotation = r.ps.get("subspace.rotation").cloned();
        }
        let (mut norm, mut mlp) = (None, None);
        if matches!(kind, SubspaceKind::ReflectSelect | SubspaceKind::MaskSelect) {
            let out = if kind == SubspaceKind::ReflectSelect { d } else { k };
            norm = Some(RmsNorm { weight: r.ones("subspace.norm.weight", d)?, eps });
            let lin = |r: &mut Registrar, name: &str, o: usize, i: usize| -> Result<Linear> {
                // Kaiming-uniform-like scale 1/√in, drawn from the seeded normal.
                Ok(Linear { weight: r.normal(&format!("subspace.mlp.{name}.weight"), o, i, 1.0 / (i as f64).sqrt())?, bias: None })
            };
            mlp = Some(Mlp { gate_proj: lin(r, "gate_proj", f, d)?, up_proj: lin(r, "up_proj", f, d)?, down_proj: lin(r, "down_proj", out, f)?, act: crate::model::Activation::Silu });
        }
        let boundary = if kind == SubspaceKind::Boundless {
            r.ps.add("subspace.boundary", Tensor::new(&[0.5f32], &dev)?)?;
            r.ps.get("subspace.boundary").cloned()
        } else {
            None
        };
        Ok(SubspaceModule { kind, rotation, norm, mlp, boundary, temperature: 1.0 })
    }

    fn conditioned(&self, z: &Tensor) -> Result<Tensor> {
        let (Some(norm), Some(mlp)) = (&self.norm, &self.mlp) else { return Err(Error::invalid("subspace module has no conditioning MLP")) };
        mlp.forward(&norm.forward(&z.unsqueeze(1)?)?)?.squeeze(1).map_err(Into::into) // [B, out]
    }

    /// `h, m [B, T, D]`, `z [B, D]` → `[B, T, D]`.
    pub fn apply(&self, h: &Tensor, m: &Tensor, z: &Tensor) -> Result<Tensor> {
        let r = || self.rotation.as_ref().map(|v| v.as_tensor()).ok_or_else(|| Error::invalid("subspace module has no rotation"));
        match self.kind {
            SubspaceKind::None => full(h, m),
            SubspaceKind::Das => das(h, m, r()?),
            SubspaceKind::ReflectSelect => {
                let u = unit_last_dim(&self.conditioned(z)?)?; // [B, D] unit rows
                reflect_select(h, m, r()?, &u)
            }
            SubspaceKind::MaskSelect => {
                let logits = self.conditioned(z)?; // [B, k]
                let mask = candle_nn::ops::sigmoid(&logits.affine(1.0 / self.temperature, 0.0)?)?;
                masked_rotation(h, m, r()?, &mask)
            }
            SubspaceKind::Boundless => {
                let beta = self.boundary.as_ref().ok_or_else(|| Error::invalid("boundless module has no boundary"))?.as_tensor().clamp(0f32, 1f32)?;
                let rot = r()?;
                let mask = boundary_mask(&beta.squeeze(0)?, rot.dim(1)?, self.temperature)?;
                masked_rotation(h, m, rot, &mask)
            }
        }
    }

    /// Re-orthonormalise the rotation (call after every optimizer step).
    pub fn retract(&self) -> Result<()> {
        if let Some(r) = &self.rotation {
            retract(r)?;
        }
        Ok(())
    }
}
