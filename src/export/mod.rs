//! Writing what a run learned in other tools' formats.
//!
//! * [`torch`]: a PyTorch `state_dict` file (`torch.save`'s zip + pickle format), written
//!   without PyTorch.
//! * [`pyvene`]: a DAS / MDAS rotation as pyvene's saved `LowRankRotatedSpaceIntervention`
//!   (`IntervenableModel.load` reads it), and HyperDAS's per-example bases as safetensors.

pub mod pyvene;
pub mod torch;
