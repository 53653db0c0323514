//! RAVEL data: generation protocol, readers (JSONL and the reference's Arrow directory),
//! collation with hand-checked token positions, and filter parity with transformers.

mod common;

use std::collections::HashSet;

use candle_core::DType;
use hyperdas::data::collate::{CollateOptions, IGNORE_INDEX, collate, encode_prompt_with_label, encode_row, encode_rows};
use hyperdas::data::filter::{FilterOptions, filter_rows};
use hyperdas::data::generate::{DataSplit, EntityPolicy, GenerateOptions, generate};
use hyperdas::data::io::{ReadOptions, read_dataset, write_arrow_dir, write_jsonl};
use hyperdas::data::ravel::{KnowledgeBase, Split};
use hyperdas::data::row::RavelRow;

use common::*;

fn opts(kb: &KnowledgeBase, split: DataSplit, seed: u64) -> GenerateOptions {
    GenerateOptions { targets: vec![kb.attribute("Country").unwrap()], split, causal: 300, isolate: 40, seed, entities: EntityPolicy::All }
}

#[test]
fn generation_follows_the_reference_protocol() {
    let kb = KnowledgeBase::builtin("city").unwrap();
    let country = kb.attribute("Country").unwrap();
    for split in [DataSplit::Train, DataSplit::Heldout] {
        let g = generate(&kb, &opts(&kb, split, 42)).unwrap();
        assert_eq!(g.rows.len(), 300 + 5 * 40);
        let distinct: HashSet<&RavelRow> = g.rows.iter().collect();
        assert_eq!(distinct.len(), g.rows.len(), "duplicate rows");
        let template_split = |attr: Option<usize>, prefix: &str, suffix: &str, entity: &str| -> Split {
            let found: Vec<Split> =
                kb.templates.iter().filter(|t| attr.is_none_or(|a| t.attribute == a) && t.fill_split(entity) == (prefix.to_string(), suffix.to_string())).map(|t| t.split).collect();
            assert!(!found.is_empty(), "no template for {prefix:?} + {suffix:?}");
            assert!(found.iter().all(|s| *s == found[0]));
            found[0]
        };
        let allowed = split.template_splits();
        for r in &g.rows {
            assert!(r.problem().is_none(), "{r:?}");
            let asked = kb.attribute(&r.attribute).unwrap();
            let (b, s) = (kb.entity(&r.entity).unwrap(), kb.entity(&r.counterfactual_entity).unwrap());
            // Labels are the knowledge base's values, and base and source differ in the asked attribute.
            assert_eq!(r.target, b.values[asked]);
            assert_eq!(r.counterfactual_target, s.values[asked]);
            assert_ne!(r.target, r.counterfactual_target);
            assert_eq!(r.edit_instruction, format!("{} ; {} - Country", r.entity, r.counterfactual_entity));
            assert!(r.input_prefix.ends_with(&r.entity) && r.counterfactual_input_prefix.ends_with(&r.counterfactual_entity));
            // Template splits: train data only train templates, test data only val + test.
            assert!(allowed.contains(&template_split(Some(asked), &r.input_prefix, &r.input_suffix, &r.entity)), "{r:?}");
            assert!(allowed.contains(&template_split(None, &r.counterfactual_input_prefix, &r.counterfactual_input_suffix, &r.counterfactual_entity)), "{r:?}");
            if r.is_causal() {
                assert_eq!(asked, country);
                assert_eq!(r.label(), r.counterfactual_target);
                // verify_text = base template filled with the source entity.
                let t = kb.templates.iter().find(|t| t.attribute == asked && t.fill(&r.entity) == r.base_prompt()).unwrap();
                assert_eq!(r.verify_text, t.fill(&r.counterfactual_entity));
            } else {
                assert_ne!(asked, country);
                assert_eq!(r.label(), r.target);
                assert_eq!(r.verify_text, r.base_prompt());
            }
        }
        for a in ["Continent", "Language", "Latitude", "Longitude", "Timezone"] {
            assert_eq!(g.rows.iter().filter(|r| r.attribute == a && !r.is_causal()).count(), 40, "{a}");
        }
    }
}

#[test]
fn generation_is_deterministic_for_a_seed() {
    let kb = KnowledgeBase::builtin("city").unwrap();
    let a = generate(&kb, &opts(&kb, DataSplit::Train, 42)).unwrap();
    let b = generate(&kb, &opts(&kb, DataSplit::Train, 42)).unwrap();
    let c = generate(&kb, &opts(&kb, DataSplit::Train, 43)).unwrap();
    assert_eq!(a.rows, b.rows);
    assert_ne!(a.rows, c.rows);
    // Train and test prompts are disjoint (different template splits).
    let test = generate(&kb, &opts(&kb, DataSplit::Heldout, 42)).unwrap();
    let train_prompts: HashSet<String> = a.rows.iter().map(|r| r.base_prompt()).collect();
    assert!(test.rows.iter().all(|r| !train_prompts.contains(&r.base_prompt())));
}

#[test]
fn held_out_entities_stay_in_their_split() {
    let kb = KnowledgeBase::builtin("city").unwrap();
    for (split, ok) in [(DataSplit::Train, &[Split::Train][..]), (DataSplit::Heldout, &[Split::Val, Split::Test][..])] {
        let o = GenerateOptions { entities: EntityPolicy::BySplit, ..opts(&kb, split, 1) };
        for r in generate(&kb, &o).unwrap().rows {
            for e in [&r.entity, &r.counterfactual_entity] {
                assert!(ok.contains(&kb.entity(e).unwrap().split), "{e} in {split:?}");
            }
        }
    }
}

#[test]
fn nobel_generation_skips_empty_values() {
    let kb = KnowledgeBase::builtin("nobel").unwrap();
    let gender = kb.attribute("gender").unwrap();
    let o = GenerateOptions { targets: vec![gender], split: DataSplit::Train, causal: 200, isolate: 10, seed: 3, entities: EntityPolicy::All };
    let g = generate(&kb, &o).unwrap();
    assert!(g.rows.iter().all(|r| !r.target.is_empty() && !r.counterfactual_target.is_empty()));
    let empty = ["Satoshi &", "Michael Houghton"];
    assert!(g.rows.iter().all(|r| !empty.contains(&r.entity.as_str()) && !empty.contains(&r.counterfactual_entity.as_str())));
}

#[test]
fn asking_for_more_rows_than_exist_is_a_clear_error() {
    // 3 entities, 2 colours, one template per attribute: few distinct rows exist.
    let tsv = "entity\tsplit\tcolor\tsize\nA\ttrain\tred\tbig\nB\ttrain\tblue\tsmall\nC\ttrain\tred\tsmall\n";
    let templates = r#"{"Color": ["The color of %s is"], "Size": ["The size of %s is"]}"#;
    let splits = r#"{"The color of %s is": "train", "The size of %s is": "train"}"#;
    let kb = KnowledgeBase::parse("toy", tsv, templates, splits, "toy").unwrap();
    let o = GenerateOptions { targets: vec![0], split: DataSplit::Train, causal: 4, isolate: 0, seed: 0, entities: EntityPolicy::All };
    assert_eq!(generate(&kb, &o).unwrap().rows.len(), 4);
    let e = generate(&kb, &GenerateOptions { causal: 50, ..o.clone() }).unwrap_err().to_string();
    assert!(e.contains("distinct causal rows for Color") && e.contains("ask for fewer rows"), "{e}");
    // No test templates at all for the test split.
    let e = generate(&kb, &GenerateOptions { split: DataSplit::Heldout, ..o }).unwrap_err().to_string();
    assert!(e.contains("no heldout templates for Color"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Readers

fn fixture_rows() -> Vec<RavelRow> {
    read_dataset(&fixture("ravel/city_country_test.jsonl"), ReadOptions::default()).unwrap().rows
}

#[test]
fn the_reference_arrow_directory_format_round_trips() {
    // Written by HF `datasets` save_to_disk (tools/make_data_fixtures.py) from the JSONL fixture.
    let hf = read_dataset(&fixture("ravel/city_country_test"), ReadOptions::default()).unwrap();
    let jsonl = fixture_rows();
    assert_eq!(jsonl.len(), 49);
    assert_eq!(hf.rows, jsonl);
    assert!(hf.skipped.is_empty() && hf.extra_columns.is_empty());
    // Our writer → our reader, and JSONL → JSONL.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("city_country_test");
    write_arrow_dir(&out, &jsonl).unwrap();
    for f in ["data-00000-of-00001.arrow", "dataset_info.json", "state.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    assert_eq!(read_dataset(&out, ReadOptions::default()).unwrap().rows, jsonl);
    // The shard alone (an .arrow path) reads too.
    assert_eq!(read_dataset(&out.join("data-00000-of-00001.arrow"), ReadOptions::default()).unwrap().rows, jsonl);
    let j = dir.path().join("x.jsonl");
    write_jsonl(&j, &jsonl).unwrap();
    assert_eq!(read_dataset(&j, ReadOptions::default()).unwrap().rows, jsonl);
    // Same features JSON as datasets writes.
    let ours: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("dataset_info.json")).unwrap()).unwrap();
    let theirs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(fixture("ravel/city_country_test/dataset_info.json")).unwrap()).unwrap();
    assert_eq!(ours["features"], theirs["features"]);
}

#[test]
fn malformed_rows_name_file_and_row_or_are_skipped_with_a_count() {
    let dir = tempfile::tempdir().unwrap();
    let mut rows = fixture_rows()[..5].to_vec();
    rows[2].input_prefix = "city: somewhere".into(); // entity not in its prefix
    let mut lines: Vec<String> = rows.iter().map(|r| serde_json::to_string(r).unwrap()).collect();
    let mut missing: serde_json::Value = serde_json::to_value(&rows[0]).unwrap();
    missing.as_object_mut().unwrap().remove("verify_text");
    lines.push(missing.to_string());
    let mut empty = rows[1].clone();
    empty.counterfactual_target = String::new();
    empty.target = String::new();
    lines.push(serde_json::to_string(&empty).unwrap());
    lines.push("{not json".into());
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();

    let e = read_dataset(&path, ReadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl") && e.contains("row 3") && e.contains("does not end with the entity") && e.contains("--skip-bad-rows"), "{e}");
    let ds = read_dataset(&path, ReadOptions { skip_bad_rows: true }).unwrap();
    assert_eq!(ds.rows.len(), 4);
    let skipped: Vec<usize> = ds.skipped.iter().map(|s| s.0).collect();
    assert_eq!(skipped, vec![3, 6, 7, 8]);
    assert!(ds.skipped[1].1.contains("missing column `verify_text`"), "{:?}", ds.skipped);
    assert!(ds.skipped[2].1.contains("empty label"), "{:?}", ds.skipped);
    assert!(ds.describe().contains("skipped 4 malformed rows"));

    // The same in the Arrow format: row numbers count from 1 across the file.
    let out = dir.path().join("arrow");
    write_arrow_dir(&out, &rows).unwrap();
    let e = read_dataset(&out, ReadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("data-00000-of-00001.arrow") && e.contains("row 3"), "{e}");
    assert_eq!(read_dataset(&out, ReadOptions { skip_bad_rows: true }).unwrap().rows.len(), 4);

    // A file that is not Arrow at all.
    let junk = dir.path().join("junk");
    std::fs::create_dir(&junk).unwrap();
    std::fs::write(junk.join("data-00000-of-00001.arrow"), b"not arrow").unwrap();
    let e = read_dataset(&junk, ReadOptions::default()).unwrap_err().to_string();
    assert!(e.contains("junk/data-00000-of-00001.arrow") && e.contains("cannot read Arrow"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// Collation (tiny tokenizer: byte-level BPE, 320 tokens, <|begin_of_text|> = 0, pad = 2)

/// `(prefix, suffix, entity)` of the base and of the source.
fn row((prefix, suffix, entity): (&str, &str, &str), (cf_prefix, cf_suffix, cf_entity): (&str, &str, &str), label: &str, causal: bool) -> RavelRow {
    RavelRow {
        input_prefix: prefix.into(),
        input_suffix: suffix.into(),
        counterfactual_input_prefix: cf_prefix.into(),
        counterfactual_input_suffix: cf_suffix.into(),
        edit_instruction: format!("{entity} ; {cf_entity} - Country"),
        entity: entity.into(),
        counterfactual_entity: cf_entity.into(),
        target: if causal { "Nowhere".into() } else { label.into() },
        counterfactual_target: if causal { label.into() } else { "Nowhere".into() },
        attribute_type: if causal { "causal" } else { "isolate" }.into(),
        domain: "city".into(),
        attribute: "Country".into(),
        verify_text: String::new(),
    }
}

fn pieces(tok: &hyperdas::model::TextTokenizer, ids: &[u32]) -> Vec<String> {
    ids.iter().map(|&i| tok.decode(&[i]).unwrap()).collect()
}

#[test]
fn collate_positions_are_hand_checked_on_the_tiny_tokenizer() {
    let lm = load(&fixture("tiny-llama"), DType::F32);
    let tok = &lm.tokenizer;
    assert_eq!(tok.start_token, Some(0));
    let o = CollateOptions::default();

    // Causal row, single-word entity, plain suffix: one BOS, a space before the label.
    let r = row(("city: Paris", ", country:", "Paris"), ("\"city\": \"São Paulo", "\", \"country\": \"", "São Paulo"), "France", true);
    let e = encode_row(tok, &r, 0, &o).unwrap();
    assert_eq!(pieces(tok, &e.base_ids), ["<|begin_of_text|>", "city", ":", " ", "P", "ar", "is", ",", " ", "country", ":", " ", "F", "r", "an", "c", "e"]);
    assert_eq!(e.base_ids.iter().filter(|&&i| i == 0).count(), 1, "exactly one BOS");
    assert_eq!(e.label_start, 11); // the separator space belongs to the label, as in the reference
    assert_eq!(e.base_visible, 7); // BOS .. "is": the prefix; not ", country:"
    assert_eq!(e.base_entity_pos, 6); // "is", the last token of Paris
    // Multi-token entity with a multi-byte character (byte offsets): São Paulo.
    let src = pieces(tok, &e.source_ids);
    assert_eq!(src[..6], ["<|begin_of_text|>", "\"", "city", "\":", " \"", "S"]);
    assert_eq!(e.source_entity_pos, 14); // the final "o" of Paulo
    assert_eq!(src[14], "o");
    assert_eq!(src[15], "\",");
    assert_eq!(e.source_visible, 15); // up to and including the entity
    assert_eq!(pieces(tok, &e.instruction_ids)[0], "<|begin_of_text|>");
    assert!(e.is_causal);

    // Isolate row whose suffix ends in a quote: no space is inserted before the label.
    let r2 = row(("\"city\": \"São Paulo", "\", \"country\": \"", "São Paulo"), ("city: Paris", ", country:", "Paris"), "Brazil", false);
    let e2 = encode_row(tok, &r2, 1, &o).unwrap();
    let p2 = pieces(tok, &e2.base_ids);
    assert_eq!(p2[e2.label_start - 1], " \"");
    assert_eq!(p2[e2.label_start..].concat(), "Brazil");
    assert_eq!(e2.base_entity_pos, 14);
    assert_eq!(e2.base_visible, 15);
    assert!(!e2.is_causal);

    // Suffix visibility widens the masks to everything but padding and labels.
    let wide = CollateOptions { base_suffix_visible: true, source_suffix_visible: true, ..Default::default() };
    let w = encode_row(tok, &r, 0, &wide).unwrap();
    assert_eq!(w.base_visible, w.label_start);
    assert_eq!(w.source_visible, w.source_ids.len());

    // Left padding: the shorter row (r, 17 base tokens) is padded to the longer one.
    let b = collate(&[&e, &e2], tok.padding_id());
    let tb = b.base_len;
    assert_eq!(tb, e.base_ids.len().max(e2.base_ids.len()));
    let pad = tb - e.base_ids.len();
    assert!(pad > 0);
    assert_eq!(&b.base_ids[..pad], &vec![2u32; pad][..]);
    assert_eq!(&b.base_attention[..pad], &vec![0u8; pad][..]);
    assert_eq!(b.base_entity_pos, vec![(pad + 6) as u32, 14]);
    // Row 0: intervention mask = the 7 prefix tokens after the padding, nothing else.
    let m0: Vec<usize> = (0..tb).filter(|&t| b.base_intervention_mask[t] == 1).collect();
    assert_eq!(m0, (pad..pad + 7).collect::<Vec<_>>());
    // Labels only on label tokens, equal to the token there.
    let l0: Vec<usize> = (0..tb).filter(|&t| b.labels[t] != IGNORE_INDEX).collect();
    assert_eq!(l0, (pad + 11..tb).collect::<Vec<_>>());
    assert!(l0.iter().all(|&t| b.labels[t] == b.base_ids[t] as i64));
    // Source side of row 1 (city: Paris, ...): shorter, left-padded, mask on its prefix.
    let ts = b.source_len;
    let row1 = &b.source_intervention_mask[ts..];
    let s1: Vec<usize> = (0..ts).filter(|&t| row1[t] == 1).collect();
    let spad = ts - e2.source_ids.len();
    assert_eq!(s1, (spad..spad + 7).collect::<Vec<_>>());
    assert_eq!(b.source_entity_pos[1] as usize, spad + 6);
    // Teacher-forcing targets: logits at t-1 predict the label token at t.
    let (k, pos, tgt, valid) = b.label_targets(3);
    assert_eq!(k, 3);
    assert_eq!(pos[..3], [(pad + 10) as u32, (pad + 11) as u32, (pad + 12) as u32]);
    assert_eq!(tgt[..3], [b.base_ids[pad + 11], b.base_ids[pad + 12], b.base_ids[pad + 13]]);
    assert_eq!(valid, vec![1; 6]);
    assert_eq!(b.is_causal, vec![true, false]);
}

#[test]
fn unusable_rows_are_errors_or_counted_skips_never_truncated() {
    let lm = load(&fixture("tiny-llama"), DType::F32);
    let tok = &lm.tokenizer;
    // A prompt ending in a space followed by a letter label: byte-level BPE merges " C" into one
    // token across the prompt/label boundary, so the label tokens cannot be separated.
    let e = encode_prompt_with_label(tok, "Welcome to ", "City").unwrap_err().to_string();
    assert!(e.contains("spans the end of the prompt"), "{e}");
    let long = row((&format!("{}Paris", "word ".repeat(60)), ", country:", "Paris"), ("city: Rome", ", country:", "Rome"), "France", true);
    let ok = row(("city: Paris", ", country:", "Paris"), ("city: Rome", ", country:", "Rome"), "France", true);
    let rows = vec![ok.clone(), long, ok];
    let strict = CollateOptions { max_len: 64, ..Default::default() };
    let e = encode_rows(tok, &rows, &strict, "x.jsonl").unwrap_err().to_string();
    assert!(e.contains("x.jsonl: row 2") && e.contains("max_len 64") && e.contains("labels are never truncated"), "{e}");
    let skip = CollateOptions { skip_unusable: true, ..strict };
    let set = encode_rows(tok, &rows, &skip, "x.jsonl").unwrap();
    assert_eq!(set.rows.iter().map(|r| r.row).collect::<Vec<_>>(), vec![0, 2]);
    assert_eq!(set.skipped.len(), 1);
    assert_eq!(set.skipped[0].0, 1);
}

// ---------------------------------------------------------------------------------------------
// Filter parity: SmolLM2-135M, our runtime vs transformers (tools/make_data_fixtures.py).

#[test]
fn smollm2_filter_decisions_match_transformers() {
    let Some(path) = smollm2() else { return };
    let lm = load(&path, DType::F32);
    let rows = fixture_rows();
    let expected: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(fixture("ravel/smollm2-filter-expected.json")).unwrap()).unwrap();
    assert_eq!(expected.len(), rows.len());
    let (kept, stats) = filter_rows(&lm.model, &lm.tokenizer, rows.clone(), &FilterOptions { batch_size: 8, progress: false }).unwrap();
    let kept: HashSet<&RavelRow> = kept.iter().collect();
    let mut compared = 0;
    for (r, x) in rows.iter().zip(&expected) {
        // Skip near-ties (a logit margin under 1e-3 could flip between two correct f32 implementations).
        if x["margin"].as_f64().unwrap() < 1e-3 {
            continue;
        }
        compared += 1;
        assert_eq!(kept.contains(r), x["pass"].as_bool().unwrap(), "row {r:?}");
    }
    assert!(compared >= 45, "{compared}");
    let passing = expected.iter().filter(|x| x["pass"].as_bool().unwrap()).count();
    assert!(passing > 0 && passing < rows.len(), "the fixture must hold both outcomes");
    assert_eq!(stats.groups.values().map(|g| g.candidates).sum::<usize>(), rows.len());
    assert_eq!(stats.groups.values().map(|g| g.kept).sum::<usize>(), kept.len());
}
