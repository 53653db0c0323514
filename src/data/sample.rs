//! Counterfactual rows sampled from known cells (RAVEL's rules, as [`super::generate`]):
//!
//! * **causal** rows for target `A`: a known cell `(t, s)` of `A` (the source entity `s` known
//!   under base template `t`), a base entity `b` whose `A` differs from `s`'s, a source template
//!   of any attribute (attribute drawn uniformly, then a template). Label: `A(s)`.
//! * **isolate** rows for target `A`: a known cell `(t', b)` of another attribute `A'` (the base
//!   entity known under its own template), a source entity whose `A'` differs from `b`'s, a
//!   source template as above. Label: `A'(b)`; the instruction still names `A`.
//!
//! **Stratification**: each group's known cells are shuffled (seeded) and used in turn, so every
//! known (entity, template) pair is used equally often (±1) and no template or entity takes more
//! than its share of known cells; isolate rows spread over the other attributes in proportion to
//! their known cells. The summary reports the largest share of any entity and any template.
//!
//! Rows are distinct (a duplicate redraws its partner and source template) and a pure
//! function of the knowledge, the options and the seed (each group has its own stream).

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::Serialize;

use super::generate::{DataSplit, EntityPolicy, make_row};
use super::ravel::{KnowledgeBase, Template};
use super::row::RavelRow;
use crate::error::{Error, Result};
use crate::rng::Rng;

/// What to sample.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// Attribute indices the instruction may name.
    pub targets: Vec<usize>,
    pub split: DataSplit,
    /// Causal rows per target attribute.
    pub causal: usize,
    /// Isolate rows per target attribute (over the other attributes).
    pub isolate: usize,
    /// The attributes isolate rows may ask for (`None`: every attribute but the target).
    pub isolate_from: Option<Vec<usize>>,
    pub seed: u64,
    pub entities: EntityPolicy,
}

/// Counts of one group (`target`, kind, the attribute the base prompt asks for).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GroupStats {
    pub target: String,
    pub attribute_type: String,
    pub attribute: String,
    pub rows: usize,
    /// Known cells available to the group.
    pub known_cells: usize,
    /// Distinct cells the rows use.
    pub cells_used: usize,
}

/// How evenly the rows use entities and templates (of their cells).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Balance {
    pub entities: usize,
    pub templates: usize,
    /// Largest share of the rows whose cell has one entity / one template.
    pub max_entity_share: f64,
    pub max_template_share: f64,
}

/// Sampled rows (shuffled) and their counts.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub rows: Vec<RavelRow>,
    pub groups: Vec<GroupStats>,
    pub balance: Balance,
}

/// Redraws of a row's partner and source template before moving to the next cell.
const REDRAWS: usize = 20;

/// Sample rows whose cells `known(template index in kb.templates, entity index)` holds.
pub fn sample(kb: &KnowledgeBase, known: &dyn Fn(usize, usize) -> bool, opts: &SampleOptions) -> Result<Sampled> {
    if opts.targets.is_empty() {
        return Err(Error::invalid(format!("no target attribute given; valid attributes: {}", kb.attributes.join(", "))));
    }
    let splits = opts.split.template_splits();
    let allowed: Vec<bool> = kb.entities.iter().map(|e| opts.entities.allows(opts.split, e.split)).collect();
    let n_attr = kb.attributes.len();
    // Per attribute: entities (allowed, with a value), and the split's templates (global indices).
    let pool: Vec<Vec<usize>> = (0..n_attr).map(|a| (0..kb.entities.len()).filter(|&e| allowed[e] && !kb.entities[e].values[a].is_empty()).collect()).collect();
    let templates: Vec<Vec<usize>> = (0..n_attr).map(|a| (0..kb.templates.len()).filter(|&t| kb.templates[t].attribute == a && splits.contains(&kb.templates[t].split)).collect()).collect();
    let source_attrs: Vec<usize> = (0..n_attr).filter(|&a| !templates[a].is_empty()).collect();
    // Known cells (attribute, template, entity) per attribute.
    let cells: Vec<Vec<(usize, usize)>> = (0..n_attr).map(|a| templates[a].iter().flat_map(|&t| pool[a].iter().filter(move |&&e| known(t, e)).map(move |&e| (t, e))).collect()).collect();

    let mut seen: HashSet<RavelRow> = HashSet::new();
    let mut rows = Vec::new();
    let mut groups = Vec::new();
    let mut targets = opts.targets.clone();
    targets.dedup();
    for &target in &targets {
        let name = &kb.attributes[target];
        for (kind, n) in [("causal", opts.causal), ("isolate", opts.isolate)] {
            if n == 0 {
                continue;
            }
            let mut group: Vec<(usize, usize, usize)> = if kind == "causal" {
                cells[target].iter().map(|&(t, e)| (target, t, e)).collect()
            } else {
                (0..n_attr).filter(|&a| a != target && opts.isolate_from.as_ref().is_none_or(|f| f.contains(&a))).flat_map(|a| cells[a].iter().map(move |&(t, e)| (a, t, e))).collect()
            };
            if templates[target].is_empty() {
                return Err(Error::invalid(format!(
                    "the {} knowledge base has no {} templates for {name} (templates of splits {:?})",
                    kb.domain,
                    opts.split.name(),
                    splits.iter().map(|s| s.name()).collect::<Vec<_>>()
                )));
            }
            if group.is_empty() {
                let what = if kind == "causal" { name.clone() } else { format!("any attribute but {name}") };
                return Err(Error::invalid(format!(
                    "no known {} cell for {kind} rows of {name}: the model knows no fact of {what} under the {} templates (see `hyperdas data knowledge`)",
                    kb.domain,
                    opts.split.name()
                )));
            }
            Rng::derive(opts.seed, &format!("{name}/{kind}/cells")).shuffle(&mut group);
            let mut rng = Rng::derive(opts.seed, &format!("{name}/{kind}"));
            let mut made: BTreeMap<usize, (usize, HashSet<(usize, usize)>)> = BTreeMap::new();
            let (mut i, mut misses) = (0usize, 0usize);
            while made.values().map(|m| m.0).sum::<usize>() < n {
                let (asked, t, e) = group[i % group.len()];
                i += 1;
                match draw(kb, target, asked, t, e, &pool[asked], &templates, &source_attrs, &mut rng, &mut seen) {
                    Some(row) => {
                        rows.push(row);
                        let m = made.entry(asked).or_default();
                        m.0 += 1;
                        m.1.insert((t, e));
                        misses = 0;
                    }
                    None => {
                        misses += 1;
                        if misses > group.len() {
                            let got: usize = made.values().map(|m| m.0).sum();
                            return Err(Error::invalid(format!(
                                "cannot draw {n} distinct {kind} rows for {name} (got {got}) from {} known cells: ask for fewer rows, or evaluate more entities (--max-entities)",
                                group.len()
                            )));
                        }
                    }
                }
            }
            let mut available: BTreeMap<usize, usize> = BTreeMap::new();
            for &(a, _, _) in &group {
                *available.entry(a).or_default() += 1;
            }
            for (a, known_cells) in available {
                let (rows, used) = made.remove(&a).map(|m| (m.0, m.1.len())).unwrap_or_default();
                groups.push(GroupStats { target: name.clone(), attribute_type: kind.into(), attribute: kb.attributes[a].clone(), rows, known_cells, cells_used: used });
            }
        }
    }
    let balance = balance(&rows);
    Rng::derive(opts.seed, "shuffle").shuffle(&mut rows);
    Ok(Sampled { rows, groups, balance })
}

/// One new row on cell `(t, e)` of `asked`, or `None` after [`REDRAWS`] duplicates.
#[allow(clippy::too_many_arguments)]
fn draw(
    kb: &KnowledgeBase,
    target: usize,
    asked: usize,
    t: usize,
    e: usize,
    partners: &[usize],
    templates: &[Vec<usize>],
    source_attrs: &[usize],
    rng: &mut Rng,
    seen: &mut HashSet<RavelRow>,
) -> Option<RavelRow> {
    let value = &kb.entities[e].values[asked];
    for _ in 0..REDRAWS {
        let partner = (0..2000).map(|_| *rng.choose(partners).unwrap_or(&e)).find(|&p| kb.entities[p].values[asked] != *value)?;
        let a = *rng.choose(source_attrs)?;
        let source_t: &Template = &kb.templates[*rng.choose(&templates[a])?];
        let cell_t = &kb.templates[t];
        // Causal: the cell's entity is the source; isolate: it is the base.
        let row = if target == asked { make_row(kb, target, asked, partner, e, cell_t, source_t) } else { make_row(kb, target, asked, e, partner, cell_t, source_t) };
        if seen.insert(row.clone()) {
            return Some(row);
        }
    }
    None
}

/// Entity and template shares of the rows' cells (causal: the source entity; isolate: the base).
fn balance(rows: &[RavelRow]) -> Balance {
    let mut entities: HashMap<&str, usize> = HashMap::new();
    let mut templates: HashMap<String, usize> = HashMap::new();
    for r in rows {
        let entity = if r.is_causal() { &r.counterfactual_entity } else { &r.entity };
        *entities.entry(entity).or_default() += 1;
        let template = format!("{}%s{}", &r.input_prefix[..r.input_prefix.len() - r.entity.len()], r.input_suffix);
        *templates.entry(template).or_default() += 1;
    }
    let share = |m: usize| if rows.is_empty() { 0.0 } else { m as f64 / rows.len() as f64 };
    Balance {
        entities: entities.len(),
        templates: templates.len(),
        max_entity_share: share(entities.values().copied().max().unwrap_or(0)),
        max_template_share: share(templates.values().copied().max().unwrap_or(0)),
    }
}
