//! The toy world: a subset of RAVEL cities with all six attributes, our own prompt templates
//! (plain, question, few-shot and JSON-style, each attribute with training and held-out
//! templates), the sentences built from them, and a word-level tokenizer.
//!
//! Tokenizer choice: **word-level** (`tokenizers` `WordLevel`), pre-tokenised by whitespace
//! and by isolating the punctuation `{ } [ ] " : , . ? !`. A city name is one token per word
//! ("Tokyo" = 1, "New York City" = 3), and most values are one token ("Europe/Paris", "-23");
//! multi-word values ("United States", "North America") and language lists ("Arabic,Armenian")
//! are a few. The vocabulary is exactly the words of the world, so nothing is ever unknown.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer, PreTokenizerWrapper, Tokenizer};

use crate::data::collate::encode_prompt_with_label;
use crate::data::ravel::KnowledgeBase;
use crate::error::{Error, Result};
use crate::model::TextTokenizer;
use crate::rng::Rng;

pub const BOS: &str = "<|begin_of_text|>";
pub const EOS: &str = "<|end_of_text|>";
pub const PAD: &str = "<|pad|>";
pub const UNK: &str = "[UNK]";
/// Characters split off as their own tokens.
const PUNCTUATION: &str = r#"[{}\[\]":,.?!()]"#;

/// The attributes of the toy world, in order.
pub fn attribute_names() -> impl Iterator<Item = &'static str> {
    ATTRIBUTES.iter().map(|(a, _, _)| *a)
}

/// (attribute, keyword used in the templates, exemplar city for few-shot templates).
const ATTRIBUTES: [(&str, &str, &str); 6] = [
    ("Country", "country", "Paris"),
    ("Continent", "continent", "Tokyo"),
    ("Language", "language", "Berlin"),
    ("Latitude", "latitude", "Sydney"),
    ("Longitude", "longitude", "Toronto"),
    ("Timezone", "timezone", "Cairo"),
];

/// Templates shared by every attribute: `{k}` keyword, `{X}` exemplar city, `{V}` its value.
/// Held-out templates are new strings that recombine the training phrasings (as RAVEL's
/// val/test templates paraphrase its train templates); none is ever trained on.
const TRAIN_TEMPLATES: [&str; 11] = [
    "The {k} of %s is",
    "%s is a city whose {k} is",
    "city: %s, {k}:",
    "{\"city\": \"%s\", \"{k}\": \"",
    "{X} has the {k} {V}. %s has the {k}",
    "Q: What is the {k} of %s? A:",
    "%s ({k}):",
    "The {k} for %s is",
    "[{\"city\": \"{X}\", \"{k}\": \"{V}\"}, {\"city\": \"%s\", \"{k}\": \"",
    "town: %s, {k}:",
    "place: %s, {k}:",
];
/// Every held-out word occurs in training: a word-level model has nothing to say about a word it
/// never saw (its embedding is the untrained initialisation), so an unseen word would test
/// luck, not generalisation (the first version's `name: %s, {k}:` did exactly that).
const HELD_OUT_TEMPLATES: [&str; 3] = ["The {k} of the city %s is", "{\"town\": \"%s\", \"{k}\": \"", "{X} has the {k} {V}. The {k} of %s is"];

/// One natural-language training template per attribute, without the keyword.
fn natural_template(attribute: &str) -> &'static str {
    match attribute {
        "Country" => "%s is a city in the country of",
        "Continent" => "%s is a city on the continent of",
        "Language" => "People in %s speak",
        "Latitude" => "%s lies at the latitude of",
        "Longitude" => "%s lies at the longitude of",
        _ => "The clocks in %s follow the timezone",
    }
}

/// A template of the toy world.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ToyTemplate {
    pub attribute: usize,
    pub text: String,
    /// false: a held-out template, never trained on.
    pub train: bool,
}

/// Cities, attributes, templates.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct World {
    pub attributes: Vec<String>,
    /// (city, values in `attributes` order).
    pub cities: Vec<(String, Vec<String>)>,
    pub templates: Vec<ToyTemplate>,
}

/// One fact in one template: `prompt` + `" "` + `value`.
#[derive(Debug, Clone)]
pub struct Example {
    pub city: usize,
    pub attribute: usize,
    pub template: usize,
    pub prompt: String,
    /// Byte span of the city name in `prompt`.
    pub entity: (usize, usize),
    pub value: String,
}

impl World {
    /// `n` cities from the RAVEL city knowledge base (the six exemplars always included),
    /// chosen by `seed` among cities with every value known and no mis-encoded characters.
    pub fn build(n: usize, seed: u64) -> Result<World> {
        Self::build_in(n, 0, seed)
    }

    /// [`World::build`] with the cities drawn from `countries` countries only (0: from all),
    /// the same number from each: the exemplars' countries first, then the countries with the
    /// most clean cities. Many cities per country make "country" a feature shared by
    /// entities, not a fact about one.
    pub fn build_in(n: usize, countries: usize, seed: u64) -> Result<World> {
        let kb = KnowledgeBase::builtin("city")?;
        let attr_idx: Vec<usize> = ATTRIBUTES.iter().map(|(a, _, _)| kb.attribute(a)).collect::<Result<_>>()?;
        let clean = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_graphic() || c == ' ');
        let mut pool: Vec<usize> = (0..kb.entities.len())
            .filter(|&i| {
                let e = &kb.entities[i];
                clean(&e.name) && attr_idx.iter().all(|&a| clean(&e.values[a]))
            })
            .collect();
        let exemplars: Vec<usize> = ATTRIBUTES
            .iter()
            .map(|(_, _, x)| kb.entities.iter().position(|e| e.name == *x).ok_or_else(|| Error::invalid(format!("exemplar city {x} is not in the knowledge base"))))
            .collect::<Result<_>>()?;
        if n < exemplars.len() || n > pool.len() {
            return Err(Error::invalid(format!("the toy world needs between {} and {} cities, got {n}", exemplars.len(), pool.len())));
        }
        pool.retain(|i| !exemplars.contains(i));
        Rng::derive(seed, "toy/cities").shuffle(&mut pool);
        let mut chosen = exemplars.clone();
        if countries == 0 {
            chosen.extend(pool.into_iter().take(n - exemplars.len()));
        } else {
            let country_of = |i: usize| kb.entities[i].values[attr_idx[0]].clone();
            let mut order: Vec<String> = Vec::new();
            for &x in &exemplars {
                if !order.contains(&country_of(x)) {
                    order.push(country_of(x));
                }
            }
            let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
            for &i in &pool {
                *counts.entry(country_of(i)).or_default() += 1;
            }
            let mut by_size: Vec<(String, usize)> = counts.into_iter().collect();
            by_size.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let rest: Vec<String> = by_size.into_iter().map(|(c, _)| c).filter(|c| !order.contains(c)).collect();
            order.extend(rest);
            if countries < order.len().min(exemplars.len()) || countries > order.len() {
                return Err(Error::invalid(format!("toy setting `countries` must be 0 or between {} and {}, got {countries}", exemplars.len(), order.len())));
            }
            order.truncate(countries);
            let per_country = n.div_ceil(countries);
            for c in &order {
                let have = chosen.iter().filter(|&&i| country_of(i) == *c).count();
                let more: Vec<usize> = pool.iter().copied().filter(|&i| country_of(i) == *c).take(per_country.saturating_sub(have)).collect();
                chosen.extend(more);
            }
            chosen.truncate(n.max(exemplars.len()));
        }
        chosen.sort_unstable();
        let cities: Vec<(String, Vec<String>)> = chosen.iter().map(|&i| (kb.entities[i].name.clone(), attr_idx.iter().map(|&a| kb.entities[i].values[a].clone()).collect())).collect();
        let mut templates = Vec::new();
        for (a, (name, keyword, _)) in ATTRIBUTES.iter().enumerate() {
            let x = &kb.entities[exemplars[a]];
            let v = &x.values[attr_idx[a]];
            let fill = |t: &str| t.replace("{k}", keyword).replace("{X}", &x.name).replace("{V}", v);
            for t in TRAIN_TEMPLATES.iter().copied().chain([natural_template(name)]) {
                templates.push(ToyTemplate { attribute: a, text: fill(t), train: true });
            }
            for t in HELD_OUT_TEMPLATES {
                templates.push(ToyTemplate { attribute: a, text: fill(t), train: false });
            }
        }
        Ok(World { attributes: ATTRIBUTES.iter().map(|(a, _, _)| a.to_string()).collect(), cities, templates })
    }

    /// Every (city, template) fact, for training templates (`train`) or held-out ones, ordered
    /// template by template and, within a template, city by city (index = template rank ×
    /// cities + city).
    pub fn examples(&self, train: bool) -> Vec<Example> {
        let mut out = Vec::new();
        for (t, tpl) in self.templates.iter().enumerate().filter(|(_, t)| t.train == train) {
            for (c, (name, values)) in self.cities.iter().enumerate() {
                let at = tpl.text.find("%s").unwrap_or(0);
                let prompt = tpl.text.replacen("%s", name, 1);
                out.push(Example { city: c, attribute: tpl.attribute, template: t, prompt, entity: (at, at + name.len()), value: values[tpl.attribute].clone() });
            }
        }
        out
    }

    /// Every text the tokenizer must cover: templates, cities, values, and the words of the
    /// HyperDAS instructions (`"Paris ; Tokyo - Country"`), so the hypernetwork reads them.
    fn texts(&self) -> Vec<String> {
        let mut v: Vec<String> = self.templates.iter().map(|t| t.text.replacen("%s", "", 1)).collect();
        v.extend(self.attributes.iter().map(|a| format!("; - {a}")));
        for (name, values) in &self.cities {
            v.push(name.clone());
            v.extend(values.iter().cloned());
        }
        v
    }

    /// The word-level tokenizer of this world (BOS prepended by the post-processor, as Llama's).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let pre = pre_tokenizer()?;
        let mut words = BTreeSet::new();
        for text in self.texts() {
            let mut pts = PreTokenizedString::from(text.as_str());
            pre.pre_tokenize(&mut pts).map_err(|e| Error::invalid(format!("pre-tokenising {text:?}: {e}")))?;
            for (w, _, _) in pts.get_splits(OffsetReferential::Original, OffsetType::Byte) {
                words.insert(w.to_string());
            }
        }
        let mut vocab: HashMap<String, u32> = HashMap::new();
        for (i, s) in [BOS, EOS, PAD, UNK].iter().enumerate() {
            vocab.insert(s.to_string(), i as u32);
        }
        for w in words {
            let id = vocab.len() as u32;
            vocab.entry(w).or_insert(id);
        }
        let model =
            tokenizers::models::wordlevel::WordLevel::builder().vocab(vocab.into_iter().collect()).unk_token(UNK.into()).build().map_err(|e| Error::invalid(format!("word-level model: {e}")))?;
        let mut tok = Tokenizer::new(model);
        tok.with_pre_tokenizer(Some(pre));
        let post = TemplateProcessing::builder()
            .try_single(format!("{BOS} $A"))
            .map_err(|e| Error::invalid(format!("post-processor: {e}")))?
            .special_tokens(vec![(BOS, 0)])
            .build()
            .map_err(|e| Error::invalid(format!("post-processor: {e}")))?;
        tok.with_post_processor(Some(post));
        let specials: Vec<tokenizers::AddedToken> = [BOS, EOS, PAD, UNK].iter().map(|s| tokenizers::AddedToken::from(s.to_string(), true)).collect();
        tok.add_special_tokens(specials).map_err(|e| Error::invalid(format!("special tokens: {e}")))?;
        Ok(tok)
    }
}

fn pre_tokenizer() -> Result<PreTokenizerWrapper> {
    let split = Split::new(SplitPattern::Regex(PUNCTUATION.into()), tokenizers::SplitDelimiterBehavior::Isolated, false).map_err(|e| Error::invalid(format!("pre-tokenizer: {e}")))?;
    Ok(PreTokenizerWrapper::Sequence(Sequence::new(vec![PreTokenizerWrapper::WhitespaceSplit(WhitespaceSplit), PreTokenizerWrapper::Split(split)])))
}

/// A tokenised example: ids (with the start token), first value token index, last city token.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub ids: Vec<u32>,
    pub label_start: usize,
    pub attribute: usize,
    /// Index in `ids` of the city's last token.
    pub entity_pos: usize,
}

pub fn encode_examples(tok: &TextTokenizer, examples: &[Example]) -> Result<Vec<Encoded>> {
    examples
        .iter()
        .map(|e| {
            let p = encode_prompt_with_label(tok, &e.prompt, &e.value)?;
            let (s0, e0) = e.entity;
            let entity_pos = p.spans.iter().rposition(|&(s, end)| s < e0 && end > s0).ok_or_else(|| Error::invalid(format!("no token covers the city in {:?}", e.prompt)))?;
            Ok(Encoded { ids: p.ids, label_start: p.label_start, attribute: e.attribute, entity_pos })
        })
        .collect()
}
