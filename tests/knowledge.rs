//! The knowledge table (src/data/knowledge.rs) and sampling from it (src/data/sample.rs): the
//! table's verdicts are the filter's, rows sampled from it pass the filter, sampling is
//! deterministic, distinct and stratified, the cache is reused, and a damaged or stale cache is
//! detected and rebuilt.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::DType;
use hyperdas::data::collate::encode_prompt_with_label;
use hyperdas::data::filter::{FilterOptions, filter_rows};
use hyperdas::data::generate::{DataSplit, EntityPolicy, GenerateOptions, generate};
use hyperdas::data::knowledge::{Cell, Evaluator, Knowledge, KnowledgeOptions, KnowledgeTable, TableKey, check_batch, ensure};
use hyperdas::data::ravel::{KnowledgeBase, Split};
use hyperdas::data::row::RavelRow;
use hyperdas::data::sample::{SampleOptions, sample};
use hyperdas::model::LoadedModel;

/// A tiny toy world: a model trained for `steps` on its 24 cities' facts, and its knowledge base.
fn build_toy(steps: usize) -> (LoadedModel, KnowledgeBase, PathBuf) {
    let out = tempfile::tempdir().unwrap().keep().join("toy");
    let cfg = hyperdas::toy::ToyConfig { steps, ..hyperdas::toy::ToyConfig::tiny() };
    hyperdas::toy::build_into(&cfg, &out, false).unwrap();
    let lm = common::load(&out, DType::F32);
    let kb = KnowledgeBase::from_dir(&out.join("ravel"), "city").unwrap();
    (lm, kb, out)
}

/// The tiny toy, fully trained (built once per test binary): it knows most facts.
fn toy() -> &'static (LoadedModel, KnowledgeBase, PathBuf) {
    static TOY: OnceLock<(LoadedModel, KnowledgeBase, PathBuf)> = OnceLock::new();
    TOY.get_or_init(|| build_toy(hyperdas::toy::ToyConfig::tiny().steps))
}

fn evaluator(lm: &LoadedModel, batch_size: usize) -> Evaluator<'_> {
    Evaluator { model: &lm.model, tokenizer: &lm.tokenizer, batch_size, progress: false }
}

fn key(lm: &LoadedModel, kb: &KnowledgeBase, a: usize) -> TableKey {
    TableKey::new(&lm.source.fingerprint().unwrap(), lm.model.dtype(), &lm.tokenizer, kb, a)
}

/// Every cell of every split, no screen.
fn everything() -> KnowledgeOptions {
    KnowledgeOptions { screen: 0, max_entities: 0, batch_size: 7, ..Default::default() }
}

#[test]
fn shared_prefix_checks_equal_the_filter_on_every_cell() {
    // Half-trained, so that it knows some facts and not others.
    let (lm, kb, _) = &build_toy(50);
    let root = tempfile::tempdir().unwrap();
    let (mut known, mut unknown) = (0, 0);
    for a in 0..kb.attributes.len() {
        let (table, report) = ensure(&evaluator(lm, 7), kb, a, key(lm, kb, a), root.path(), &everything(), false).unwrap();
        assert_eq!(report.full_entities, kb.entities.len());
        // The filter on one row per cell: a causal row whose source is the cell's entity under
        // the cell's template checks exactly (template(entity), value).
        let mut rows = Vec::new();
        let mut cells = Vec::new();
        for (t, tpl) in kb.templates.iter().filter(|t| t.attribute == a).enumerate() {
            for (e, ent) in kb.entities.iter().enumerate() {
                let Some(partner) = kb.entities.iter().position(|x| x.values[a] != ent.values[a]) else { continue };
                rows.push(hyperdas::data::generate::make_row(kb, a, a, partner, e, tpl, tpl));
                cells.push((t, e));
            }
        }
        let keep: HashSet<RavelRow> = filter_rows(&lm.model, &lm.tokenizer, rows.clone(), &FilterOptions { batch_size: 16, progress: false }).unwrap().0.into_iter().collect();
        for (r, (t, e)) in rows.iter().zip(cells) {
            let cell = table.templates[t].cells[e];
            assert!(cell.checked(), "{t} {e}");
            assert_eq!(cell == Cell::Known, keep.contains(r), "{}: cell ({t}, {e}) = {cell:?}, the filter keeps it: {}", kb.attributes[a], keep.contains(r));
            if cell == Cell::Known { known += 1 } else { unknown += 1 }
        }
    }
    // Both verdicts are exercised.
    assert!(known > 200 && unknown > 200, "known {known}, unknown {unknown}");
}

#[test]
fn check_batch_mixes_prefix_lengths_and_label_lengths() {
    let (lm, kb, _) = toy();
    // Prompts of different templates share only the start token; their labels have 1..n tokens.
    let mut prompts = Vec::new();
    for t in kb.templates.iter().step_by(11) {
        let e = &kb.entities[t.text.len() % kb.entities.len()];
        prompts.push(encode_prompt_with_label(&lm.tokenizer, &t.fill(&e.name), &e.values[t.attribute]).unwrap());
    }
    let refs: Vec<_> = prompts.iter().collect();
    let (together, _) = check_batch(&lm.model, &refs).unwrap();
    for (p, want) in prompts.iter().zip(&together) {
        let (alone, _) = check_batch(&lm.model, &[p]).unwrap();
        assert_eq!(alone[0], *want);
    }
}

fn sampled(knowledge: &Knowledge, kb: &KnowledgeBase, seed: u64, causal: usize, isolate: usize, split: DataSplit) -> hyperdas::data::sample::Sampled {
    let targets = vec![kb.attribute("Country").unwrap()];
    sample(kb, &|t, e| knowledge.known(t, e), &SampleOptions { targets, split, causal, isolate, isolate_from: None, seed, entities: EntityPolicy::All }).unwrap()
}

fn toy_knowledge(root: &Path) -> Knowledge {
    let (lm, kb, _) = toy();
    let attrs: Vec<(usize, bool)> = (0..kb.attributes.len()).map(|a| (a, a != 0)).collect();
    let opts = KnowledgeOptions { pilot: 6, max_entities: 16, batch_size: 16, ..Default::default() };
    Knowledge::build(&evaluator(lm, 16), kb, &attrs, &lm.source.fingerprint().unwrap(), root, &opts).unwrap().0
}

#[test]
fn sampled_rows_pass_the_filter_and_are_deterministic_distinct_and_stratified() {
    let (lm, kb, _) = toy();
    let root = tempfile::tempdir().unwrap();
    let knowledge = toy_knowledge(root.path());
    // (The toy world has train and test templates, no val.)
    for split in [DataSplit::Train, DataSplit::Test, DataSplit::Heldout] {
        let s = sampled(&knowledge, kb, 1, 400, 300, split);
        assert_eq!(s.rows.len(), 700);
        assert_eq!(s.rows.iter().filter(|r| r.is_causal()).count(), 400);
        // Agree with the old filter: it keeps every sampled row.
        let (kept, _) = filter_rows(&lm.model, &lm.tokenizer, s.rows.clone(), &FilterOptions { batch_size: 32, progress: false }).unwrap();
        assert_eq!(kept.len(), s.rows.len(), "{split:?}: the filter rejects sampled rows");
        // Distinct rows; templates of the split only.
        assert_eq!(s.rows.iter().collect::<HashSet<_>>().len(), s.rows.len());
        let allowed: HashSet<(String, String)> =
            kb.templates.iter().filter(|t| split.template_splits().contains(&t.split)).map(|t| (t.text[..t.slot].to_string(), t.text[t.slot + 2..].to_string())).collect();
        for r in &s.rows {
            let base = (r.input_prefix[..r.input_prefix.len() - r.entity.len()].to_string(), r.input_suffix.clone());
            assert!(allowed.contains(&base), "{split:?}: {r:?}");
        }
        // Stratified: every known cell of the causal group is used equally often (±1).
        let mut uses: HashMap<(String, String, String), usize> = HashMap::new();
        for r in s.rows.iter().filter(|r| r.is_causal()) {
            *uses.entry((r.input_prefix[..r.input_prefix.len() - r.entity.len()].to_string(), r.input_suffix.clone(), r.counterfactual_entity.clone())).or_default() += 1;
        }
        let g = s.groups.iter().find(|g| g.attribute_type == "causal").unwrap();
        assert_eq!(uses.len(), g.known_cells.min(400), "{split:?}: {g:?}");
        let (lo, hi) = (uses.values().min().unwrap(), uses.values().max().unwrap());
        assert!(hi - lo <= 1, "{split:?}: cell uses range {lo}..{hi}");
        assert!(s.balance.max_entity_share < 0.2 && s.balance.max_template_share < 0.25, "{split:?}: {:?}", s.balance);
    }
    // Determinism per seed; another seed gives other rows.
    let a = sampled(&knowledge, kb, 1, 200, 100, DataSplit::Train);
    assert_eq!(a.rows, sampled(&knowledge, kb, 1, 200, 100, DataSplit::Train).rows);
    assert_ne!(a.rows, sampled(&knowledge, kb, 2, 200, 100, DataSplit::Train).rows);
}

#[test]
fn the_cache_is_reused_and_a_damaged_or_stale_file_is_rebuilt() {
    let (lm, kb, _) = toy();
    let root = tempfile::tempdir().unwrap();
    let a = kb.attribute("Continent").unwrap();
    let opts = KnowledgeOptions { pilot: 4, max_entities: 10, batch_size: 16, ..Default::default() };
    let ev = evaluator(lm, 16);
    let (first, r1) = ensure(&ev, kb, a, key(lm, kb, a), root.path(), &opts, false).unwrap();
    assert!(r1.total().cells > 0 && r1.rebuilt.is_none());
    assert_eq!(r1.full_entities, 10);
    assert!(r1.screened >= r1.pilot_entities && r1.screen_templates.len() == 1, "{r1:?}");
    let path = PathBuf::from(&r1.path);
    assert!(path.starts_with(root.path()) && path.is_file());
    // Reused: nothing to evaluate, the same verdicts.
    let (again, r2) = ensure(&ev, kb, a, key(lm, kb, a), root.path(), &opts, false).unwrap();
    assert_eq!(r2.total().cells, 0);
    assert_eq!(again.to_text().unwrap(), first.to_text().unwrap());
    // More entities: only the new cells are evaluated.
    let more = KnowledgeOptions { max_entities: 14, ..opts.clone() };
    let (_, r3) = ensure(&ev, kb, a, key(lm, kb, a), root.path(), &more, false).unwrap();
    assert_eq!(r3.full_entities, 14);
    let per_entity = first.templates.len();
    assert!(r3.total().cells <= 4 * per_entity, "{:?}", r3.total());

    // A flipped verdict: the checksum catches it; the file is set aside and rebuilt.
    let text = std::fs::read_to_string(&path).unwrap();
    let damaged = text.replacen("\"cells\":\"1", "\"cells\":\"0", 1);
    assert_ne!(damaged, text);
    std::fs::write(&path, damaged).unwrap();
    let (_, r4) = ensure(&ev, kb, a, key(lm, kb, a), root.path(), &more, false).unwrap();
    let why = r4.rebuilt.clone().unwrap();
    assert!(why.contains("corrupt") && why.contains("checksum") && why.contains(".bad"), "{why}");
    assert!(r4.total().cells > 0);
    assert!(path.with_extension("json.bad").is_file());
    // Truncated: corrupt too.
    std::fs::write(&path, &text[..text.len() / 2]).unwrap();
    let (_, r5) = ensure(&ev, kb, a, key(lm, kb, a), root.path(), &more, false).unwrap();
    assert!(r5.rebuilt.unwrap().contains("corrupt"));
    // A sound file built for another model: stale.
    let mut other = KnowledgeTable::from_text(&std::fs::read_to_string(&path).unwrap()).unwrap();
    other.key.model_sha256 = "0".repeat(64);
    std::fs::write(&path, other.to_text().unwrap()).unwrap();
    let (_, r6) = ensure(&ev, kb, a, key(lm, kb, a), root.path(), &more, false).unwrap();
    let why = r6.rebuilt.unwrap();
    assert!(why.contains("stale") && why.contains("another model"), "{why}");
}

#[test]
fn the_screen_stops_at_the_cap_and_skips_barely_known_isolate_attributes() {
    let (lm, kb, _) = toy();
    let root = tempfile::tempdir().unwrap();
    let a = kb.attribute("Country").unwrap();
    let ev = evaluator(lm, 16);
    let opts = KnowledgeOptions { pilot: 4, max_entities: 6, batch_size: 16, ..Default::default() };
    let (table, r) = ensure(&ev, kb, a, key(lm, kb, a), root.path(), &opts, false).unwrap();
    assert_eq!(r.full_entities, 6);
    assert!(r.screen_recall.is_some() && r.pilot_rate.unwrap() > 0.5, "{r:?}");
    // Entities beyond the cap and the screened chunk are left unchecked.
    let checked = (0..kb.entities.len()).filter(|&e| table.templates.iter().any(|t| t.cells[e].checked())).count();
    assert!(checked <= r.screened && r.screened <= kb.entities.len(), "{checked} {r:?}");
    let full: HashSet<usize> = r.full_set.iter().copied().collect();
    for &e in &r.full_set {
        assert!(table.templates.iter().all(|t| t.cells[e].checked()), "entity {e} evaluated in full");
    }
    assert!((0..kb.entities.len()).filter(|e| !full.contains(e)).all(|e| table.templates.iter().filter(|t| t.split != Split::Train).all(|t| !t.cells[e].checked())));
    // An isolate-only attribute whose pilot rate is below the threshold is skipped.
    let strict = KnowledgeOptions { min_pilot_rate: 1.01, ..opts };
    let b = kb.attribute("Language").unwrap();
    let (_, r) = ensure(&ev, kb, b, key(lm, kb, b), root.path(), &strict, true).unwrap();
    assert!(r.skipped.as_deref().is_some_and(|w| w.contains("pilot knew")), "{r:?}");
    assert_eq!(r.full_entities, 0);
}

#[test]
fn nobel_and_no_filter_use_the_same_path() {
    // Every fact counted as known (`data build --no-filter`), on both embedded domains.
    for domain in ["city", "nobel"] {
        let kb = KnowledgeBase::builtin(domain).unwrap();
        let targets = vec![0];
        let o = SampleOptions { targets, split: DataSplit::Val, causal: 300, isolate: 200, isolate_from: Some(vec![2, 3]), seed: 3, entities: EntityPolicy::BySplit };
        let s = sample(&kb, &|_, _| true, &o).unwrap();
        assert_eq!(s.rows.len(), 500);
        for r in &s.rows {
            assert_eq!(kb.entity(&r.entity).unwrap().split, Split::Val);
            let asked = kb.attribute(&r.attribute).unwrap();
            assert!(r.is_causal() || asked == 2 || asked == 3, "isolate rows only from the chosen attributes: {r:?}");
            assert!(r.problem().is_none(), "{r:?}");
        }
    }
    // A model that knows nothing: the table is complete, and sampling says so clearly.
    let lm = common::load(&common::fixture("tiny-llama"), DType::F32);
    let kb = KnowledgeBase::builtin("nobel").unwrap();
    let root = tempfile::tempdir().unwrap();
    let opts = KnowledgeOptions { splits: vec![Split::Val], pilot: 3, max_entities: 4, batch_size: 32, ..Default::default() };
    let (k, reports) = Knowledge::build(&evaluator(&lm, 32), &kb, &[(0, false)], &lm.source.fingerprint().unwrap(), root.path(), &opts).unwrap();
    assert_eq!(reports[0].attribute, "Field");
    let e = sample(&kb, &|t, e| k.known(t, e), &SampleOptions { targets: vec![0], split: DataSplit::Val, causal: 5, isolate: 0, isolate_from: None, seed: 0, entities: EntityPolicy::All })
        .unwrap_err()
        .to_string();
    assert!(e.contains("no known nobel_prize_winner cell for causal rows of Field"), "{e}");
}

#[test]
fn generate_and_sample_make_the_same_rows_from_the_same_draws() {
    // make_row is shared: a generated row rebuilt from its own entities and templates is equal.
    let kb = KnowledgeBase::builtin("city").unwrap();
    let g = generate(&kb, &GenerateOptions { targets: vec![0], split: DataSplit::Train, causal: 20, isolate: 4, seed: 9, entities: EntityPolicy::All }).unwrap();
    for r in &g.rows {
        let asked = kb.attribute(&r.attribute).unwrap();
        let b = kb.entities.iter().position(|e| e.name == r.entity).unwrap();
        let s = kb.entities.iter().position(|e| e.name == r.counterfactual_entity).unwrap();
        let bt = kb.templates.iter().find(|t| t.attribute == asked && t.fill_split(&r.entity) == (r.input_prefix.clone(), r.input_suffix.clone())).unwrap();
        let st = kb.templates.iter().find(|t| t.fill_split(&r.counterfactual_entity) == (r.counterfactual_input_prefix.clone(), r.counterfactual_input_suffix.clone())).unwrap();
        assert_eq!(&hyperdas::data::generate::make_row(&kb, 0, asked, b, s, bt, st), r);
    }
}
