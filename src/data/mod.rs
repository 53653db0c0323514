//! RAVEL counterfactual data: the knowledge base, pair generation, filtering by the target
//! model, dataset readers/writers and collation.
//!
//! | step | module | gives |
//! |---|---|---|
//! | knowledge base | [`ravel`] | entities × attributes, templates with their context split (embedded) |
//! | generation | [`generate`] | causal + isolate [`RavelRow`]s, distinct, deterministic for a seed |
//! | filtering | [`filter`] | rows whose label the frozen model predicts (teacher-forced), pass rates |
//! | storage | [`io`] | JSONL and HF `save_to_disk` (Arrow IPC stream) read/write |
//! | collation | [`collate`] | token ids, labels, intervention masks, entity positions, left-padded |
//!
//! `hyperdas data build` runs the first three and writes the fourth (docs/data.md).

pub mod build;
pub mod collate;
pub mod filter;
pub mod generate;
pub mod io;
pub mod knowledge;
pub mod ravel;
pub mod row;
pub mod sample;

pub use collate::{CollateOptions, CollatedBatch, EncodedRow, EncodedSet, collate, encode_rows};
pub use generate::{DataSplit, EntityPolicy, GenerateOptions, generate};
pub use io::{Dataset, ReadOptions, read_dataset, write_dataset};
pub use ravel::{KnowledgeBase, Split};
pub use row::{COLUMNS, RavelRow};
