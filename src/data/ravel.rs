//! The RAVEL knowledge base: entities with attribute values, and prompt templates with their
//! context split (Huang et al., ACL 2024; MIT license, see `data/ravel/LICENSE`).
//!
//! The city and Nobel-laureate domains are embedded in the binary (`data/ravel/`), so nothing
//! is read from disk at run time; [`KnowledgeBase::from_dir`] reads any other domain stored in
//! the same three-file format (`entities.tsv`, `templates.json`, `template_splits.json`).
//!
//! Attribute names keep RAVEL's spelling (`Country`, `Country of Birth`); lookups also accept
//! any case and the TSV column spelling (`country_of_birth`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};

/// A RAVEL split (entity split or template/context split).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Val,
    Test,
}

impl Split {
    pub fn parse(s: &str) -> Option<Split> {
        match s {
            "train" => Some(Split::Train),
            "val" => Some(Split::Val),
            "test" => Some(Split::Test),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

/// One entity (a city, a laureate) and its attribute values, indexed like
/// [`KnowledgeBase::attributes`]. An empty string means "unknown" (RAVEL has such rows).
#[derive(Debug, Clone)]
pub struct Entity {
    pub name: String,
    pub split: Split,
    pub values: Vec<String>,
}

/// A prompt template with exactly one `%s` (the entity slot).
#[derive(Debug, Clone)]
pub struct Template {
    /// Index into [`KnowledgeBase::attributes`]: the attribute this template asks for.
    pub attribute: usize,
    pub text: String,
    pub split: Split,
    /// Byte offset of `%s` in `text`.
    pub slot: usize,
}

impl Template {
    /// `(prefix, suffix)` of the filled prompt: the prefix ends with the entity.
    pub fn fill_split(&self, entity: &str) -> (String, String) {
        let mut prefix = String::with_capacity(self.slot + entity.len());
        prefix.push_str(&self.text[..self.slot]);
        prefix.push_str(entity);
        (prefix, self.text[self.slot + 2..].to_string())
    }

    /// The filled prompt.
    pub fn fill(&self, entity: &str) -> String {
        let (p, s) = self.fill_split(entity);
        p + &s
    }
}

/// Entities, attributes and templates of one RAVEL domain.
#[derive(Debug, Clone)]
pub struct KnowledgeBase {
    /// RAVEL's file key: `city`, `nobel_prize_winner`, ...
    pub domain: String,
    /// RAVEL spelling (`Country`, `Country of Birth`), in the TSV column order.
    pub attributes: Vec<String>,
    pub entities: Vec<Entity>,
    pub templates: Vec<Template>,
}

/// The embedded domains: (name, entities.tsv, templates.json, template_splits.json).
const BUILTIN: &[(&str, &str, &str, &str)] = &[
    ("city", include_str!("../../data/ravel/entities.tsv"), include_str!("../../data/ravel/templates.json"), include_str!("../../data/ravel/template_splits.json")),
    (
        "nobel_prize_winner",
        include_str!("../../data/ravel/nobel_prize_winner/entities.tsv"),
        include_str!("../../data/ravel/nobel_prize_winner/templates.json"),
        include_str!("../../data/ravel/nobel_prize_winner/template_splits.json"),
    ),
];

/// Names of the embedded domains.
pub fn builtin_domains() -> Vec<&'static str> {
    BUILTIN.iter().map(|b| b.0).collect()
}

/// `Country of Birth` → `country_of_birth` (the TSV column spelling).
pub fn column_name(attribute: &str) -> String {
    attribute.trim().to_lowercase().replace([' ', '-'], "_")
}

impl KnowledgeBase {
    /// An embedded domain: `city`, or `nobel_prize_winner` (alias `nobel`).
    pub fn builtin(domain: &str) -> Result<KnowledgeBase> {
        let key = match domain {
            "nobel" => "nobel_prize_winner",
            d => d,
        };
        let Some((name, tsv, templates, splits)) = BUILTIN.iter().find(|b| b.0 == key) else {
            return Err(Error::invalid(format!(
                "unknown RAVEL domain `{domain}`; the embedded domains are: {} (or give --kb-dir with entities.tsv, templates.json, template_splits.json)",
                builtin_domains().join(", ")
            )));
        };
        let src = format!("embedded data/ravel ({name})");
        Self::parse(name, tsv, templates, splits, &src)
    }

    /// A domain stored as `dir/entities.tsv`, `dir/templates.json`, `dir/template_splits.json`.
    pub fn from_dir(dir: &Path, domain: &str) -> Result<KnowledgeBase> {
        let read = |f: &str| -> Result<String> {
            let p = dir.join(f);
            std::fs::read_to_string(&p).map_err(|e| Error::file(&p, format!("cannot read: {e}")))
        };
        let tsv = read("entities.tsv")?;
        let templates = read("templates.json")?;
        let splits = read("template_splits.json")?;
        Self::parse(domain, &tsv, &templates, &splits, &dir.display().to_string())
    }

    /// Parse the three files; `src` names them in errors.
    pub fn parse(domain: &str, tsv: &str, templates_json: &str, splits_json: &str, src: &str) -> Result<KnowledgeBase> {
        let bad = |file: &str, msg: String| Error::invalid(format!("{src}/{file}: {msg}"));
        let templates_map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(templates_json).map_err(|e| bad("templates.json", format!("not a JSON object: {e}")))?;
        let splits_map: BTreeMap<String, String> = serde_json::from_str(splits_json).map_err(|e| bad("template_splits.json", format!("not a JSON object of strings: {e}")))?;

        let mut lines = tsv.lines();
        let header: Vec<&str> = lines.next().ok_or_else(|| bad("entities.tsv", "empty file".into()))?.split('\t').collect();
        if header.len() < 3 || header[0] != "entity" || header[1] != "split" {
            return Err(bad("entities.tsv", format!("line 1: header must start with `entity\\tsplit\\t<attribute>...`, got {header:?}")));
        }
        // Map each TSV column to its RAVEL attribute name through templates.json's keys.
        let mut attributes = Vec::new();
        for col in &header[2..] {
            let name = templates_map
                .keys()
                .find(|k| column_name(k) == *col)
                .ok_or_else(|| bad("entities.tsv", format!("column `{col}` has no templates in templates.json (its keys: {})", templates_map.keys().cloned().collect::<Vec<_>>().join(", "))))?;
            attributes.push(name.clone());
        }
        let mut entities = Vec::new();
        for (i, line) in lines.enumerate() {
            if line.is_empty() {
                continue;
            }
            let f: Vec<&str> = line.split('\t').collect();
            if f.len() != header.len() {
                return Err(bad("entities.tsv", format!("line {}: {} fields, the header has {}", i + 2, f.len(), header.len())));
            }
            let split = Split::parse(f[1]).ok_or_else(|| bad("entities.tsv", format!("line {}: split `{}` is not train/val/test", i + 2, f[1])))?;
            if f[0].is_empty() {
                return Err(bad("entities.tsv", format!("line {}: empty entity name", i + 2)));
            }
            entities.push(Entity { name: f[0].to_string(), split, values: f[2..].iter().map(|s| s.to_string()).collect() });
        }
        let mut templates = Vec::new();
        for (a, name) in attributes.iter().enumerate() {
            let list = templates_map[name].as_array().ok_or_else(|| bad("templates.json", format!("`{name}` is not a list of strings")))?;
            for t in list {
                let text = t.as_str().ok_or_else(|| bad("templates.json", format!("`{name}` holds a non-string: {t}")))?;
                let slot = text.find("%s").ok_or_else(|| bad("templates.json", format!("template {text:?} has no %s")))?;
                if text.matches('%').count() != 1 {
                    return Err(bad("templates.json", format!("template {text:?} must hold exactly one % (the %s slot)")));
                }
                let split = splits_map.get(text).ok_or_else(|| bad("template_splits.json", format!("no split for template {text:?}")))?;
                let split = Split::parse(split).ok_or_else(|| bad("template_splits.json", format!("split `{split}` of {text:?} is not train/val/test")))?;
                templates.push(Template { attribute: a, text: text.to_string(), split, slot });
            }
        }
        Ok(KnowledgeBase { domain: domain.to_string(), attributes, entities, templates })
    }

    /// Index of an attribute by RAVEL name, any case, or TSV column name.
    pub fn attribute(&self, name: &str) -> Result<usize> {
        let want = column_name(name);
        self.attributes
            .iter()
            .position(|a| column_name(a) == want)
            .ok_or_else(|| Error::invalid(format!("unknown attribute `{name}` for domain {}; valid attributes: {}", self.domain, self.attributes.join(", "))))
    }

    /// Templates of attribute `a` whose split is in `splits`.
    pub fn templates_of(&self, a: usize, splits: &[Split]) -> Vec<&Template> {
        self.templates.iter().filter(|t| t.attribute == a && splits.contains(&t.split)).collect()
    }

    /// Entity by exact name.
    pub fn entity(&self, name: &str) -> Option<&Entity> {
        self.entities.binary_search_by(|e| e.name.as_str().cmp(name)).ok().map(|i| &self.entities[i]).or_else(|| self.entities.iter().find(|e| e.name == name))
    }

    /// sha256 (hex) of the domain's content: its name, attributes, entities (name, split,
    /// values) and templates (attribute, text, split), so caches built from it (the knowledge
    /// table) notice any edit.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let mut field = |s: &str| {
            h.update(s.as_bytes());
            h.update([0u8]);
        };
        field(&self.domain);
        self.attributes.iter().for_each(|a| field(a));
        for e in &self.entities {
            field(&e.name);
            field(e.split.name());
            e.values.iter().for_each(|v| field(v));
        }
        for t in &self.templates {
            field(&self.attributes[t.attribute]);
            field(&t.text);
            field(t.split.name());
        }
        crate::fetch::hex(&h.finalize())
    }

    /// Number of distinct non-empty values of attribute `a`.
    pub fn num_values(&self, a: usize) -> usize {
        let mut v: Vec<&str> = self.entities.iter().map(|e| e.values[a].as_str()).filter(|v| !v.is_empty()).collect();
        v.sort_unstable();
        v.dedup();
        v.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn city_matches_the_documented_counts() {
        let kb = KnowledgeBase::builtin("city").unwrap();
        assert_eq!(kb.attributes, ["Country", "Continent", "Language", "Latitude", "Longitude", "Timezone"]);
        assert_eq!(kb.entities.len(), 3552);
        let n = |s| kb.entities.iter().filter(|e| e.split == s).count();
        assert_eq!((n(Split::Train), n(Split::Val), n(Split::Test)), (1787, 818, 947));
        assert_eq!(kb.templates.len(), 273);
        assert_eq!(kb.num_values(kb.attribute("continent").unwrap()), 6);
        let country = kb.attribute("Country").unwrap();
        assert_eq!(kb.templates_of(country, &[Split::Train]).len(), 22);
        assert_eq!(kb.templates_of(country, &[Split::Val, Split::Test]).len(), 24);
        assert_eq!(kb.entity("Paris").unwrap().values[country], "France");
    }

    #[test]
    fn nobel_matches_the_documented_counts() {
        let kb = KnowledgeBase::builtin("nobel").unwrap();
        assert_eq!(kb.domain, "nobel_prize_winner");
        assert_eq!(kb.entities.len(), 928);
        assert_eq!(kb.templates.len(), 301);
        assert_eq!(kb.attribute("country_of_birth").unwrap(), kb.attribute("Country of Birth").unwrap());
        let empty = kb.entities.iter().filter(|e| e.values.iter().all(|v| v.is_empty())).count();
        assert_eq!(empty, 2);
    }

    #[test]
    fn unknown_names_list_the_valid_ones() {
        let e = KnowledgeBase::builtin("planet").unwrap_err().to_string();
        assert!(e.contains("city") && e.contains("nobel_prize_winner"), "{e}");
        let kb = KnowledgeBase::builtin("city").unwrap();
        let e = kb.attribute("Population").unwrap_err().to_string();
        assert!(e.contains("Population") && e.contains("Country, Continent, Language"), "{e}");
    }

    #[test]
    fn fill_split_keeps_whitespace_and_splits_at_the_slot() {
        let t = Template { attribute: 0, text: " she lives in %s, her country is".into(), split: Split::Train, slot: 14 };
        assert_eq!(t.fill_split("Paris"), (" she lives in Paris".to_string(), ", her country is".to_string()));
    }

    #[test]
    fn malformed_files_name_file_and_line() {
        let e = KnowledgeBase::parse("x", "entity\tsplit\tcolor\nA\ttrain\n", r#"{"Color": ["%s is"]}"#, r#"{"%s is": "train"}"#, "dir").unwrap_err().to_string();
        assert!(e.contains("dir/entities.tsv") && e.contains("line 2"), "{e}");
        let e = KnowledgeBase::parse("x", "entity\tsplit\tcolor\nA\ttrain\tred\n", r#"{"Color": ["%s is 100%"]}"#, r#"{"%s is 100%": "train"}"#, "dir").unwrap_err().to_string();
        assert!(e.contains("exactly one %"), "{e}");
    }
}
