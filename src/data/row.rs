//! One counterfactual example in the reference's 13-column layout (HyperDAS
//! `experiments/RAVEL/data/*`), and its validation.

use serde::{Deserialize, Serialize};

/// The 13 columns, in the reference's order.
pub const COLUMNS: [&str; 13] = [
    "input_prefix",
    "input_suffix",
    "counterfactual_input_prefix",
    "counterfactual_input_suffix",
    "edit_instruction",
    "entity",
    "counterfactual_entity",
    "target",
    "counterfactual_target",
    "attribute_type",
    "domain",
    "attribute",
    "verify_text",
];

/// A base/source pair with its instruction and labels.
///
/// * base prompt = `input_prefix + input_suffix`; the prefix ends with `entity`.
/// * source prompt = `counterfactual_input_prefix + counterfactual_input_suffix`.
/// * `attribute` is what the base prompt asks for; the instruction names the attribute
///   being intervened on. Causal rows (`attribute_type == "causal"`, same attribute) must
///   answer `counterfactual_target`; isolate rows (another attribute) must keep `target`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RavelRow {
    pub input_prefix: String,
    pub input_suffix: String,
    pub counterfactual_input_prefix: String,
    pub counterfactual_input_suffix: String,
    pub edit_instruction: String,
    pub entity: String,
    pub counterfactual_entity: String,
    pub target: String,
    pub counterfactual_target: String,
    pub attribute_type: String,
    pub domain: String,
    pub attribute: String,
    pub verify_text: String,
}

impl RavelRow {
    pub fn is_causal(&self) -> bool {
        self.attribute_type == "causal"
    }

    /// The label the intervened model must produce.
    pub fn label(&self) -> &str {
        if self.is_causal() { &self.counterfactual_target } else { &self.target }
    }

    /// The base prompt without the label.
    pub fn base_prompt(&self) -> String {
        format!("{}{}", self.input_prefix, self.input_suffix)
    }

    pub fn source_prompt(&self) -> String {
        format!("{}{}", self.counterfactual_input_prefix, self.counterfactual_input_suffix)
    }

    /// The attribute named by the instruction (`"... - Country"` → `Country`).
    pub fn instruction_attribute(&self) -> Option<&str> {
        self.edit_instruction.rsplit_once(" - ").map(|(_, a)| a)
    }

    /// Why this row cannot be used, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if self.attribute_type != "causal" && self.attribute_type != "isolate" {
            return Some(format!("attribute_type is {:?}, expected \"causal\" or \"isolate\"", self.attribute_type));
        }
        if self.entity.is_empty() || self.counterfactual_entity.is_empty() {
            return Some("empty entity or counterfactual_entity".into());
        }
        if !self.input_prefix.ends_with(&self.entity) {
            return Some(format!("input_prefix {:?} does not end with the entity {:?}", self.input_prefix, self.entity));
        }
        if !self.counterfactual_input_prefix.ends_with(&self.counterfactual_entity) {
            return Some(format!("counterfactual_input_prefix {:?} does not end with the counterfactual_entity {:?}", self.counterfactual_input_prefix, self.counterfactual_entity));
        }
        if self.label().trim().is_empty() {
            let col = if self.is_causal() { "counterfactual_target" } else { "target" };
            return Some(format!("empty label ({col} of a {} row)", self.attribute_type));
        }
        if self.edit_instruction.trim().is_empty() {
            return Some("empty edit_instruction".into());
        }
        None
    }

    /// Column values in [`COLUMNS`] order.
    pub fn values(&self) -> [&str; 13] {
        [
            &self.input_prefix,
            &self.input_suffix,
            &self.counterfactual_input_prefix,
            &self.counterfactual_input_suffix,
            &self.edit_instruction,
            &self.entity,
            &self.counterfactual_entity,
            &self.target,
            &self.counterfactual_target,
            &self.attribute_type,
            &self.domain,
            &self.attribute,
            &self.verify_text,
        ]
    }

    /// Build from column values in [`COLUMNS`] order.
    pub fn from_values(v: [String; 13]) -> RavelRow {
        let [
            input_prefix,
            input_suffix,
            counterfactual_input_prefix,
            counterfactual_input_suffix,
            edit_instruction,
            entity,
            counterfactual_entity,
            target,
            counterfactual_target,
            attribute_type,
            domain,
            attribute,
            verify_text,
        ] = v;
        RavelRow {
            input_prefix,
            input_suffix,
            counterfactual_input_prefix,
            counterfactual_input_suffix,
            edit_instruction,
            entity,
            counterfactual_entity,
            target,
            counterfactual_target,
            attribute_type,
            domain,
            attribute,
            verify_text,
        }
    }
}

/// The text the model continues with the label: no space is inserted when the prompt already
/// ends in a space, `"`, `'` or `(` (the reference's rule).
pub fn label_separator(prompt: &str) -> &'static str {
    if prompt.ends_with([' ', '"', '\'', '(']) { "" } else { " " }
}
