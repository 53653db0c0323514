//! `hyperdas export pyvene`: a trained run in pyvene's saved-intervention layout
//! (src/export/pyvene.rs).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};

#[derive(Subcommand, Debug)]
pub enum ExportCommand {
    /// DAS / MDAS: config.json + intkey_*.bin that `pyvene.IntervenableModel.load(dir, model)` reads (the layer converted: our resid_pre l is pyvene's block_output l−1). HyperDAS: bases.safetensors, one basis per row of a dataset.
    Pyvene(PyveneArgs),
}

#[derive(Args, Debug)]
pub struct PyveneArgs {
    /// The run directory (`hyperdas train --out` or `hyperdas baseline --out`).
    #[arg(long)]
    run: PathBuf,
    /// Output directory (created; existing files in it are replaced).
    #[arg(long, short)]
    out: PathBuf,
    /// HyperDAS only: the dataset whose rows get a basis each [default: the run's data.test].
    #[arg(long)]
    data: Option<PathBuf>,
    /// HyperDAS only: at most this many rows (0: all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
    /// Device to load the run onto: `cpu`, `cuda` or `cuda:N` [default: the run's own model.device] (checkpoints are device-independent).
    #[arg(long)]
    device: Option<String>,
}

pub fn run(cmd: &ExportCommand) -> Result<()> {
    match cmd {
        ExportCommand::Pyvene(a) => {
            let run = crate::experiment::run::load_run_on(&a.run, crate::experiment::run::Reload { device: a.device.as_deref(), ..Default::default() }, true)?;
            let files = crate::export::pyvene::export(&run, &a.run, &a.out, a.data.as_deref(), a.limit)?;
            if super::json() {
                return super::print_json(&serde_json::json!({"run": a.run, "written": files}));
            }
            for f in files {
                println!("wrote {}", f.display());
            }
            Ok(())
        }
    }
}
