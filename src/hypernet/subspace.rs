//! The subspace module of HyperDAS (docs/method.md §4): its parameters, registered under
//! `subspace.*`, and how it turns `(h, m, z)` into the intervened residual with the pure
//! functions of [`crate::intervention::subspace`].
//!
//! | kind | parameters | new vector |
//! |---|---|---|
//! | `reflect_select` (default) | `R [D, k]`, RMSNorm + SwiGLU `D → F → D` | `u = g(norm(z))/‖·‖`, `W = (I − 2uuᵀ)R`, `h + WWᵀ(m − h)` |
//! | `reflect_select`, `reflections = n > 1` (ours) | `R [D, k]`, RMSNorm + SwiGLU `D → F → n·D` | `u_i` = the i-th `D`-slice of `g(norm(z))`, each unit; `W = (I − 2u_1u_1ᵀ)⋯(I − 2u_nu_nᵀ)R` |
//! | `das` | `R [D, k]` | `h + RRᵀ(m − h)` |
//! | `mask_select` | `R [D, k]`, RMSNorm + SwiGLU `D → F → k` | `h + R diag(σ(g(norm(z))/T)) Rᵀ (m − h)` |
//! | `boundless` | `R [D, D]`, boundary β (init 0.5) | `h + R diag(σ((βD − i)/T)) Rᵀ (m − h)` |
//! | `none` | — | `m` |
//!
//! F is the target's MLP width with `init = "ours"`; `init = "reference"` uses the reference's
//! hard-coded 14336 (Llama-3-8B's width, whatever the model) and PyTorch's default
//! `U(±1/√fan_in)` weights, with its RMSNorm ε of 1e-5.
//!
//! `R` is orthonormal at initialisation (seeded QR). Two ways keep it so under AdamW:
//! `retraction` (ours: `R` is the parameter, replaced by its polar factor after every step,
//! [`SubspaceModule::retract`]) and `householder` (the reference's
//! `torch.nn.utils.parametrizations.orthogonal` on a tall matrix):
//!
//! ```text
//! A [D, k] trainable (only its strictly lower triangle is live), init 0
//! V = tril(A, −1) + I[D, k];  τ_j = 2 / ‖V_j‖²;  H_j = I − τ_j V_j V_jᵀ
//! R = base · (−H_1 H_2 ⋯ H_k I[D, k])      base [D, D] orthonormal, base[:, :k] = R_0
//! ```
//!
//! so that `R = R_0` at `A = 0` (the reference keeps `A`'s diagonal at −1 and multiplies by its
//! sign; with no weight decay on the rotation it never moves, so the sign is the constant −1
//! here). `base` is the seeded orthonormal completion of `R_0`, rebuilt from the seed when a run
//! is loaded. The two parametrisations learn at different speeds from the same gradients.

use candle_core::{DType, Tensor, Var};

use super::Registrar;
use crate::error::{Error, Result};
use crate::intervention::orthonormal::{random_orthonormal, retract};
use crate::intervention::subspace::{boundary_mask, das, full, masked_rotation, reflect_select, reflect_select_many, reflected_bases, unit_last_dim};
use crate::model::llama::{Linear, Mlp, RmsNorm};

/// Which subspace module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
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

    /// The output width of the module's conditioning MLP for hidden size `d`, rank `k` and
    /// `reflections` per instruction: `reflections · d` for ReflectSelect, `k` for MaskSelect,
    /// 0 for the modules not conditioned on the instruction.
    pub fn conditioning_width(self, d: usize, k: usize, reflections: usize) -> usize {
        match self {
            SubspaceKind::ReflectSelect => reflections * d,
            SubspaceKind::MaskSelect => k,
            SubspaceKind::Das | SubspaceKind::Boundless | SubspaceKind::None => 0,
        }
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

impl TryFrom<String> for SubspaceKind {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        SubspaceKind::parse(&s)
    }
}

impl From<SubspaceKind> for String {
    fn from(k: SubspaceKind) -> String {
        k.name().to_string()
    }
}

/// How the subspace module's new weights are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubspaceInit {
    /// MLP width = the target's FFN width, weights N(0, 1/√fan_in), the target's RMSNorm ε.
    #[default]
    Ours,
    /// The reference: width 14336, weights U(±1/√fan_in) (PyTorch's `nn.Linear` default), ε 1e-5.
    Reference,
}

/// How the rotation stays orthonormal (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationParam {
    /// `R` itself is trained and retracted to its polar factor after every step.
    #[default]
    Retraction,
    /// The reference's Householder parametrisation (`subspace.rotation_householder`).
    Householder,
}

/// The reference's hard-coded MLP width (Llama-3-8B's FFN width).
pub const REFERENCE_MLP_WIDTH: usize = 14336;

/// The rotation's parameters.
pub enum Rotation {
    /// `subspace.rotation [D, k]`, retracted after each step.
    Direct(Var),
    /// `subspace.rotation_householder [D, k]` and the fixed completion `base [D, D]`.
    Householder { a: Var, base: Tensor },
}

/// The module and its parameters.
pub struct SubspaceModule {
    pub kind: SubspaceKind,
    /// `[D, k]` (`[D, D]` for boundless); absent for `none`.
    pub rotation: Option<Rotation>,
    /// Conditioning on the hypernetwork state (reflect_select, mask_select).
    pub norm: Option<RmsNorm>,
    pub mlp: Option<Mlp>,
    /// Boundless DAS's boundary β ∈ [0, 1] (clamped at use).
    pub boundary: Option<Var>,
    /// Mask temperature (mask_select, boundless), set by the schedule before each step
    /// ([`temperature`]).
    pub temperature: f64,
    /// Householder reflections per instruction (reflect_select; 1 = the paper's module).
    pub reflections: usize,
}

/// The reference's mask temperature at `step` of `total`: `linspace(start, end, total + 1)[step]`
/// (50 → 0.1 by default), so evaluation after training uses `end`.
pub fn temperature(step: usize, total: usize, start: f64, end: f64) -> f64 {
    if total == 0 {
        return end;
    }
    let t = step.min(total) as f64 / total as f64;
    start + (end - start) * t
}

impl SubspaceModule {
    /// Register the module's parameters. `d` hidden size, `f` MLP width (with `init = ours`),
    /// `k` rank, `reflections` Householder reflections per instruction (reflect_select only).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(r: &mut Registrar, kind: SubspaceKind, d: usize, f: usize, k: usize, reflections: usize, seed: u64, eps: f64, init: SubspaceInit, param: RotationParam) -> Result<Self> {
        if kind != SubspaceKind::None && kind != SubspaceKind::Boundless && (k == 0 || k > d) {
            return Err(Error::invalid(format!("subspace rank k must be in 1..={d}, got {k}")));
        }
        check_reflections(kind, reflections, k)?;
        let dev = r.device.clone();
        let mut rotation = None;
        if kind != SubspaceKind::None {
            let cols = if kind == SubspaceKind::Boundless { d } else { k };
            rotation = Some(match param {
                RotationParam::Retraction => {
                    let init = random_orthonormal(d, cols, seed, DType::F32, &dev)?;
                    r.copy("subspace.rotation", &init)?;
                    Rotation::Direct(r.ps.get("subspace.rotation").cloned().ok_or_else(|| Error::invalid("subspace.rotation not registered"))?)
                }
                RotationParam::Householder => {
                    // The first `cols` columns of the full draw are R_0 (the same draw as `retraction`).
                    let base = random_orthonormal(d, d, seed, DType::F32, &dev)?; // [D, D]
                    let a = r.ps.add("subspace.rotation_householder", Tensor::zeros((d, cols), DType::F32, &dev)?)?;
                    Rotation::Householder { a, base }
                }
            });
        }
        let (mut norm, mut mlp) = (None, None);
        let out = kind.conditioning_width(d, k, reflections);
        if out > 0 {
            let (f, eps) = match init {
                SubspaceInit::Ours => (f, eps),
                SubspaceInit::Reference => (REFERENCE_MLP_WIDTH, 1e-5),
            };
            norm = Some(RmsNorm { weight: r.ones("subspace.norm.weight", d)?, eps });
            let lin = |r: &mut Registrar, name: &str, o: usize, i: usize| -> Result<Linear> {
                let name = format!("subspace.mlp.{name}.weight");
                let scale = 1.0 / (i as f64).sqrt();
                let weight = match init {
                    SubspaceInit::Ours => r.normal(&name, o, i, scale)?,
                    SubspaceInit::Reference => r.uniform(&name, o, i, scale)?,
                };
                Ok(Linear::new(weight, None))
            };
            mlp = Some(Mlp { gate_proj: Some(lin(r, "gate_proj", f, d)?), up_proj: lin(r, "up_proj", f, d)?, down_proj: lin(r, "down_proj", out, f)?, act: crate::model::Activation::Silu });
        }
        let boundary = if kind == SubspaceKind::Boundless {
            r.ps.add("subspace.boundary", Tensor::new(&[0.5f32], &dev)?)?;
            r.ps.get("subspace.boundary").cloned()
        } else {
            None
        };
        Ok(SubspaceModule { kind, rotation, norm, mlp, boundary, temperature: 1.0, reflections })
    }

    /// The orthonormal basis `R [D, k]` (a graph node: gradients reach its parameters).
    pub fn rotation(&self) -> Result<Tensor> {
        match &self.rotation {
            None => Err(Error::invalid("subspace module has no rotation")),
            Some(Rotation::Direct(v)) => Ok(v.as_tensor().clone()),
            Some(Rotation::Householder { a, base }) => householder_basis(a.as_tensor(), base),
        }
    }

    fn conditioned(&self, z: &Tensor) -> Result<Tensor> {
        let (Some(norm), Some(mlp)) = (&self.norm, &self.mlp) else { return Err(Error::invalid("subspace module has no conditioning MLP")) };
        mlp.forward(&norm.forward(&z.unsqueeze(1)?)?)?.squeeze(1).map_err(Into::into) // [B, out]
    }

    /// ReflectSelect's unit vectors `u [B, n, D]`: the conditioning MLP's `[B, n·D]` output cut
    /// into `n` slices of `D`, each scaled to unit length.
    fn reflection_vectors(&self, z: &Tensor) -> Result<Tensor> {
        let out = self.conditioned(z)?; // [B, n·D]
        let (b, nd) = out.dims2()?;
        unit_last_dim(&out.reshape((b, self.reflections, nd / self.reflections))?) // [B, n, D]
    }

    /// `h, m [B, T, D]`, `z [B, D]` → `[B, T, D]`.
    pub fn apply(&self, h: &Tensor, m: &Tensor, z: &Tensor) -> Result<Tensor> {
        match self.kind {
            SubspaceKind::None => full(h, m),
            SubspaceKind::Das => das(h, m, &self.rotation()?),
            SubspaceKind::ReflectSelect if self.reflections == 1 => reflect_select(h, m, &self.rotation()?, &self.reflection_vectors(z)?.squeeze(1)?),
            SubspaceKind::ReflectSelect => reflect_select_many(h, m, &self.rotation()?, &self.reflection_vectors(z)?),
            SubspaceKind::MaskSelect => {
                let logits = self.conditioned(z)?; // [B, k]
                let mask = candle_nn::ops::sigmoid(&logits.affine(1.0 / self.temperature, 0.0)?)?; // [B, k]
                masked_rotation(h, m, &self.rotation()?, &mask)
            }
            SubspaceKind::Boundless => {
                let beta = self.boundary.as_ref().ok_or_else(|| Error::invalid("boundless module has no boundary"))?.as_tensor().clamp(0f32, 1f32)?;
                let rot = self.rotation()?; // [D, D]
                let mask = boundary_mask(&beta.squeeze(0)?, rot.dim(1)?, self.temperature)?; // [D]
                masked_rotation(h, m, &rot, &mask)
            }
        }
    }

    /// The basis each of `b` examples intervenes in, `[B, D, k]`: `R`; `(I − 2uuᵀ) R` for
    /// ReflectSelect; `R diag(σ)` for MaskSelect and Boundless DAS. `z [B, D]` is the
    /// hypernetwork state the conditioned modules read (None for the baselines).
    pub fn basis(&self, z: Option<&Tensor>, b: usize) -> Result<Tensor> {
        let r = self.rotation()?; // [D, k]
        let (d, k) = r.dims2()?;
        let need_z = || z.ok_or_else(|| Error::invalid(format!("the {} subspace is conditioned on the instruction: it needs the hypernetwork's state", self.kind.name())));
        match self.kind {
            SubspaceKind::None => Err(Error::invalid("subspace = none intervenes on the whole residual: there is no basis")),
            SubspaceKind::Das => Ok(r.unsqueeze(0)?.broadcast_as((b, d, k))?.contiguous()?),
            SubspaceKind::ReflectSelect => reflected_bases(&r, &self.reflection_vectors(need_z()?)?), // [B, D, k]
            SubspaceKind::MaskSelect => {
                let logits = self.conditioned(need_z()?)?; // [B, k]
                let mask = candle_nn::ops::sigmoid(&logits.affine(1.0 / self.temperature, 0.0)?)?; // [B, k]
                Ok(r.unsqueeze(0)?.broadcast_mul(&mask.unsqueeze(1)?)?) // [B, D, k]
            }
            SubspaceKind::Boundless => {
                let beta = self.boundary.as_ref().ok_or_else(|| Error::invalid("boundless module has no boundary"))?.as_tensor().clamp(0f32, 1f32)?;
                let mask = boundary_mask(&beta.squeeze(0)?, k, self.temperature)?; // [k]
                Ok(r.broadcast_mul(&mask.unsqueeze(0)?)?.unsqueeze(0)?.broadcast_as((b, d, k))?.contiguous()?) // [B, D, k]
            }
        }
    }

    /// Re-orthonormalise the rotation (call after every optimizer step; the Householder
    /// parametrisation is orthonormal by construction).
    pub fn retract(&self) -> Result<()> {
        if let Some(Rotation::Direct(r)) = &self.rotation {
            retract(r)?;
        }
        Ok(())
    }
}

/// `interpreter.reflections`: at least 1, and more than 1 only for reflect_select (at most `k`:
/// `n` reflections change at most `n` of the `k` directions, so more than `k` adds nothing).
fn check_reflections(kind: SubspaceKind, reflections: usize, k: usize) -> Result<()> {
    if reflections == 0 {
        return Err(Error::invalid("interpreter.reflections must be at least 1 (1 = the paper's ReflectSelect)"));
    }
    if reflections > 1 && kind != SubspaceKind::ReflectSelect {
        return Err(Error::invalid(format!("interpreter.reflections = {reflections} applies to subspace = \"reflect_select\" only, not {:?}; set it to 1", kind.name())));
    }
    if reflections > k && kind == SubspaceKind::ReflectSelect {
        return Err(Error::invalid(format!("interpreter.reflections = {reflections} is more than the rank k = {k}: n reflections change at most n of the k directions")));
    }
    Ok(())
}

/// `base · (−H_1 ⋯ H_k I[D, k])` from `a [D, k]` (its strictly lower triangle) and `base [D, D]`:
/// torch's `householder_product` for the reference's orthogonal parametrisation, from
/// differentiable ops.
pub fn householder_basis(a: &Tensor, base: &Tensor) -> Result<Tensor> {
    let (d, k) = a.dims2()?;
    let dev = a.device();
    let below: Vec<f32> = (0..d * k).map(|i| if i / k > i % k { 1.0 } else { 0.0 }).collect();
    let below = Tensor::from_vec(below, (d, k), dev)?.to_dtype(a.dtype())?; // [D, k]
    let eye = Tensor::eye(d, a.dtype(), dev)?.narrow(1, 0, k)?; // [D, k]
    let v = ((a * below)? + &eye)?; // [D, k]: column j is (0…0, 1, a_{j+1..D, j})
    let tau = v.sqr()?.sum(0)?.recip()?.affine(2.0, 0.0)?; // [k]
    let mut q = eye.clone(); // [D, k]
    for j in (0..k).rev() {
        let vj = v.narrow(1, j, 1)?; // [D, 1]
        let tj = tau.narrow(0, j, 1)?; // [1]
        let proj = vj.t()?.matmul(&q)?; // [1, k]
        q = (q - vj.matmul(&proj)?.broadcast_mul(&tj)?)?; // [D, k]: H_j q
    }
    Ok(base.matmul(&q.neg()?)?) // [D, k]
}
