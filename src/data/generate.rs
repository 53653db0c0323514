//! Counterfactual pair generation from the RAVEL knowledge base (the reference's
//! `generate_ravel_dataset`, docs/method.md §8.5, without Wikipedia source prompts, which
//! RAVEL's license situation keeps out of the repo).
//!
//! For each target attribute `A` (the attribute the instruction names):
//!
//! * **causal** rows: base and source entities whose `A` values differ; the base template asks
//!   for `A`; the source template is any attribute's template (attribute drawn uniformly, then
//!   a template); instruction `"{base} ; {source} - {A}"`; label = the source's `A` value;
//!   `verify_text` = the base template filled with the source entity.
//! * **isolate** rows, for every other attribute `A'`: entities whose `A'` values differ; the
//!   base template asks for `A'`; the instruction still names `A`; label = the base's own `A'`
//!   value; `verify_text` = the base prompt.
//!
//! Templates follow RAVEL's context split: `train` data uses `train` templates, `test` data uses
//! `val` + `test` templates (so train and test prompts are disjoint, as in the reference).
//! Entities come from every RAVEL split by default, as in the reference (which therefore tests
//! only template generalisation); [`EntityPolicy::BySplit`] also holds out entities (`train`
//! entities for train data, `val` + `test` entities for test data).
//!
//! Determinism: every (target, kind, attribute) group draws from its own stream derived from
//! the seed, so the rows are a pure function of the options. Rows are distinct.

use std::collections::HashSet;

use serde::Serialize;

use super::ravel::{KnowledgeBase, Split, Template};
use super::row::RavelRow;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// Which data split to build: its templates are RAVEL's context split of the same name, so
/// train, val and test prompts are disjoint. `heldout` is val + test together (the split the
/// demo and earlier versions called `test`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataSplit {
    Train,
    Val,
    Test,
    Heldout,
}

impl DataSplit {
    pub fn parse(s: &str) -> Result<DataSplit> {
        match s {
            "train" => Ok(DataSplit::Train),
            "val" => Ok(DataSplit::Val),
            "test" => Ok(DataSplit::Test),
            "heldout" => Ok(DataSplit::Heldout),
            _ => Err(Error::invalid(format!("unknown split `{s}`: use train, val, test or heldout (val + test)"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DataSplit::Train => "train",
            DataSplit::Val => "val",
            DataSplit::Test => "test",
            DataSplit::Heldout => "heldout",
        }
    }
    /// RAVEL template (context) splits used by this data split; with
    /// [`EntityPolicy::BySplit`], also the entity splits.
    pub fn template_splits(self) -> &'static [Split] {
        match self {
            DataSplit::Train => &[Split::Train],
            DataSplit::Val => &[Split::Val],
            DataSplit::Test => &[Split::Test],
            DataSplit::Heldout => &[Split::Val, Split::Test],
        }
    }
}

/// Which entities may appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum EntityPolicy {
    /// All entities in every split (the reference: only templates are held out).
    All,
    /// Each data split uses the RAVEL entities of its own split(s) (train data `train`
    /// entities, val data `val`, test data `test`, heldout `val` + `test`).
    BySplit,
}

impl EntityPolicy {
    /// Whether an entity of RAVEL split `s` may appear in data split `split`.
    pub fn allows(self, split: DataSplit, s: Split) -> bool {
        match self {
            EntityPolicy::All => true,
            EntityPolicy::BySplit => split.template_splits().contains(&s),
        }
    }
}

impl EntityPolicy {
    pub fn parse(s: &str) -> Result<EntityPolicy> {
        match s {
            "all" => Ok(EntityPolicy::All),
            "by-split" | "heldout" => Ok(EntityPolicy::BySplit),
            _ => Err(Error::invalid(format!("unknown entity policy `{s}`: use all (the reference) or by-split (hold out entities too)"))),
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Attribute indices the instruction may name.
    pub targets: Vec<usize>,
    pub split: DataSplit,
    /// Causal rows per target attribute.
    pub causal: usize,
    /// Isolate rows per (target attribute, other attribute).
    pub isolate: usize,
    pub seed: u64,
    pub entities: EntityPolicy,
}

/// Draw attempts per row before concluding that the pool cannot supply more distinct rows.
const MAX_ATTEMPTS: usize = 2000;

struct Pools<'a> {
    kb: &'a KnowledgeBase,
    /// Per attribute: entity indices (in the entity pool) with a non-empty value.
    with_value: Vec<Vec<usize>>,
    /// Per attribute: templates in the template split.
    templates: Vec<Vec<&'a Template>>,
    /// Attributes that have at least one template (source template draws).
    source_attrs: Vec<usize>,
}

impl<'a> Pools<'a> {
    fn new(kb: &'a KnowledgeBase, opts: &GenerateOptions) -> Pools<'a> {
        let entity_ok = |s: Split| opts.entities.allows(opts.split, s);
        let n_attr = kb.attributes.len();
        let with_value = (0..n_attr).map(|a| kb.entities.iter().enumerate().filter(|(_, e)| entity_ok(e.split) && !e.values[a].is_empty()).map(|(i, _)| i).collect()).collect();
        let templates: Vec<Vec<&Template>> = (0..n_attr).map(|a| kb.templates_of(a, opts.split.template_splits())).collect();
        let source_attrs = (0..n_attr).filter(|&a| !templates[a].is_empty()).collect();
        Pools { kb, with_value, templates, source_attrs }
    }

    /// Two entities whose values of attribute `a` differ.
    fn pair(&self, a: usize, rng: &mut Rng) -> Option<(usize, usize)> {
        let pool = &self.with_value[a];
        let base = *rng.choose(pool)?;
        let bv = &self.kb.entities[base].values[a];
        for _ in 0..MAX_ATTEMPTS {
            let s = *rng.choose(pool)?;
            if self.kb.entities[s].values[a] != *bv {
                return Some((base, s));
            }
        }
        None
    }

    fn source_template(&self, rng: &mut Rng) -> Option<&'a Template> {
        let a = *rng.choose(&self.source_attrs)?;
        rng.choose(&self.templates[a]).copied()
    }

    /// One row: base prompt asks for `asked`, the instruction names `target`.
    fn row(&self, target: usize, asked: usize, rng: &mut Rng) -> Option<RavelRow> {
        let (b, s) = self.pair(asked, rng)?;
        let base_t = *rng.choose(&self.templates[asked])?;
        let source_t = self.source_template(rng)?;
        Some(make_row(self.kb, target, asked, b, s, base_t, source_t))
    }
}

/// The row whose base prompt is `base_t` filled with entity `b` (asking for attribute `asked`),
/// whose source prompt is `source_t` filled with entity `s`, and whose instruction names
/// `target`: causal when `target == asked` (label: the source's value, checked on
/// `base_t(s)`), isolate otherwise (label: the base's own value, checked on the base prompt).
pub fn make_row(kb: &KnowledgeBase, target: usize, asked: usize, b: usize, s: usize, base_t: &Template, source_t: &Template) -> RavelRow {
    let (base, source) = (&kb.entities[b], &kb.entities[s]);
    let (input_prefix, input_suffix) = base_t.fill_split(&base.name);
    let (cf_prefix, cf_suffix) = source_t.fill_split(&source.name);
    let causal = target == asked;
    let verify_text = if causal { base_t.fill(&source.name) } else { format!("{input_prefix}{input_suffix}") };
    RavelRow {
        input_prefix,
        input_suffix,
        counterfactual_input_prefix: cf_prefix,
        counterfactual_input_suffix: cf_suffix,
        edit_instruction: format!("{} ; {} - {}", base.name, source.name, kb.attributes[target]),
        entity: base.name.clone(),
        counterfactual_entity: source.name.clone(),
        target: base.values[asked].clone(),
        counterfactual_target: source.values[asked].clone(),
        attribute_type: if causal { "causal" } else { "isolate" }.into(),
        domain: kb.domain.clone(),
        attribute: kb.attributes[asked].clone(),
        verify_text,
    }
}

/// Counts of one generated group.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupPlan {
    /// The instruction's attribute.
    pub target: String,
    pub attribute_type: String,
    /// The attribute the base prompt asks for.
    pub attribute: String,
    pub rows: usize,
}

/// Generated rows (shuffled) and how many of each kind.
#[derive(Debug, Clone)]
pub struct Generated {
    pub rows: Vec<RavelRow>,
    pub groups: Vec<GroupPlan>,
}

/// Generate causal and isolate rows.
pub fn generate(kb: &KnowledgeBase, opts: &GenerateOptions) -> Result<Generated> {
    if opts.targets.is_empty() {
        return Err(Error::invalid(format!("no target attribute given; valid attributes: {}", kb.attributes.join(", "))));
    }
    let pools = Pools::new(kb, opts);
    let mut seen: HashSet<RavelRow> = HashSet::new();
    let mut rows = Vec::new();
    let mut groups = Vec::new();
    let mut targets = opts.targets.clone();
    targets.dedup();
    for &target in &targets {
        let mut plan: Vec<(usize, usize)> = vec![(target, opts.causal)];
        plan.extend((0..kb.attributes.len()).filter(|&a| a != target).map(|a| (a, opts.isolate)));
        for (asked, n) in plan {
            if n == 0 {
                continue;
            }
            let kind = if asked == target { "causal" } else { "isolate" };
            let name = &kb.attributes[asked];
            if pools.templates[asked].is_empty() {
                return Err(Error::invalid(format!("{} has no {} templates for {name}", kb.domain, opts.split.name())));
            }
            // Cheap upper bound on the distinct rows of this group (entity pairs × base
            // templates × source templates), so an impossible request fails at once.
            let entities = pools.with_value[asked].len() as f64;
            let source_templates: usize = pools.source_attrs.iter().map(|&a| pools.templates[a].len()).sum();
            let bound = entities * (entities - 1.0) * pools.templates[asked].len() as f64 * source_templates as f64;
            if (n as f64) > bound {
                return Err(Error::invalid(format!(
                    "cannot draw {n} distinct {kind} rows for {name}: at most {bound} exist ({} entities with a known {name}, {} templates); ask for fewer rows",
                    pools.with_value[asked].len(),
                    pools.templates[asked].len()
                )));
            }
            let mut rng = Rng::derive(opts.seed, &format!("{}/{kind}/{}", kb.attributes[target], name));
            let mut made = 0;
            while made < n {
                let mut fresh = None;
                for _ in 0..MAX_ATTEMPTS {
                    let Some(row) = pools.row(target, asked, &mut rng) else { break };
                    if !seen.contains(&row) {
                        fresh = Some(row);
                        break;
                    }
                }
                let Some(row) = fresh else {
                    return Err(Error::invalid(format!(
                        "cannot draw {n} distinct {kind} rows for {name} (got {made}): the {} entities with a known {name} ({} distinct values) and {} templates are too few; ask for fewer rows",
                        pools.with_value[asked].len(),
                        kb.num_values(asked),
                        pools.templates[asked].len()
                    )));
                };
                seen.insert(row.clone());
                rows.push(row);
                made += 1;
            }
            groups.push(GroupPlan { target: kb.attributes[target].clone(), attribute_type: kind.into(), attribute: name.clone(), rows: n });
        }
    }
    Rng::derive(opts.seed, "shuffle").shuffle(&mut rows);
    Ok(Generated { rows, groups })
}
