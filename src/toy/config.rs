//! The toy world's settings: every field is part of the cache key of a built toy model.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Settings of a toy world and its model. Every field is part of the cache key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToyConfig {
    pub seed: u64,
    /// Cities drawn from RAVEL (the six few-shot exemplars included).
    pub cities: usize,
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate_size: usize,
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Steps between accuracy measurements on a sample (for the curve).
    pub eval_every: usize,
    /// Draw the cities from this many countries, the same number from each (0: from all
    /// countries at random). See [`crate::toy::world::World::build_in`].
    #[serde(default)]
    pub countries: usize,
    /// The first this-many blocks are token-local: their attention weights are held at zero, so
    /// each position's residual is changed by its own MLP only (entity enrichment).
    #[serde(default)]
    pub token_local_blocks: usize,
    /// The last this-many blocks are attention-only: their MLP weights are held at zero, so
    /// no position after the entity can look facts up; they can only be read, by attention,
    /// from where they were written (attribute extraction).
    #[serde(default)]
    pub attention_only_blocks: usize,
    /// Plant these attributes, each in its own known subspace, by interchange intervention
    /// training ([`crate::toy::plant`]); empty: no plant.
    #[serde(default)]
    pub plant_attributes: Vec<String>,
    /// The planted subspace lives in the residual entering this block, at the city's last token.
    #[serde(default)]
    pub plant_layer: usize,
    /// Dimension of each planted subspace.
    #[serde(default)]
    pub plant_dims: usize,
    /// Weight of the interchange loss beside the language-model loss.
    #[serde(default)]
    pub plant_weight: f64,
}

impl ToyConfig {
    /// The default toy world (docs/toy.md): 10 countries × 20 cities; block 0 token-local
    /// (enrichment), blocks 1–2 attention-only (extraction); Country and Continent planted in 8 dimensions each of
    /// the residual entering block 1 at the city's token.
    pub fn standard() -> Self {
        ToyConfig {
            seed: 0,
            cities: 200,
            hidden_size: 128,
            layers: 3,
            heads: 8,
            intermediate_size: 512,
            steps: 500,
            batch_size: 64,
            lr: 3e-3,
            warmup_steps: 100,
            weight_decay: 0.1,
            eval_every: 200,
            countries: 10,
            token_local_blocks: 1,
            attention_only_blocks: 2,
            plant_attributes: vec!["Country".into(), "Continent".into()],
            plant_layer: 1,
            plant_dims: 8,
            plant_weight: 1.0,
        }
    }

    /// A smaller variant of the same code path, for tests.
    pub fn tiny() -> Self {
        ToyConfig {
            seed: 0,
            cities: 24,
            hidden_size: 64,
            layers: 1,
            heads: 4,
            intermediate_size: 256,
            steps: 300,
            batch_size: 32,
            lr: 5e-3,
            warmup_steps: 20,
            weight_decay: 0.0,
            eval_every: 50,
            countries: 0,
            token_local_blocks: 0,
            attention_only_blocks: 0,
            plant_attributes: Vec::new(),
            plant_layer: 0,
            plant_dims: 0,
            plant_weight: 0.0,
        }
    }

    /// Reject settings that cannot train (each error names the setting).
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("cities", self.cities),
            ("hidden_size", self.hidden_size),
            ("layers", self.layers),
            ("heads", self.heads),
            ("intermediate_size", self.intermediate_size),
            ("steps", self.steps),
            ("batch_size", self.batch_size),
            ("eval_every", self.eval_every),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err(Error::invalid(format!("toy setting `{k}` must be at least 1")));
            }
        }
        if self.token_local_blocks >= self.layers {
            return Err(Error::invalid(format!(
                "toy setting `token_local_blocks` ({}) must be below `layers` ({}): some block must move information between positions",
                self.token_local_blocks, self.layers
            )));
        }
        if self.token_local_blocks + self.attention_only_blocks > self.layers || self.attention_only_blocks >= self.layers {
            return Err(Error::invalid(format!(
                "toy settings `token_local_blocks` ({}) + `attention_only_blocks` ({}) must not exceed `layers` ({}), and some block must keep its MLP",
                self.token_local_blocks, self.attention_only_blocks, self.layers
            )));
        }
        if !self.hidden_size.is_multiple_of(self.heads) {
            return Err(Error::invalid(format!("toy setting `hidden_size` ({}) must be a multiple of `heads` ({})", self.hidden_size, self.heads)));
        }
        if !self.plant_attributes.is_empty() {
            for (i, a) in self.plant_attributes.iter().enumerate() {
                if !super::world::attribute_names().any(|n| n == a) {
                    return Err(Error::invalid(format!("toy setting `plant_attributes`: {a:?} is not one of {:?}", super::world::attribute_names().collect::<Vec<_>>())));
                }
                if self.plant_attributes[..i].contains(a) {
                    return Err(Error::invalid(format!("toy setting `plant_attributes`: {a:?} is listed twice")));
                }
            }
            if self.plant_layer >= self.layers {
                return Err(Error::invalid(format!("toy setting `plant_layer` ({}) must be below `layers` ({}): some block must read the planted subspace", self.plant_layer, self.layers)));
            }
            if self.plant_dims == 0 || self.plant_dims * self.plant_attributes.len() > self.hidden_size {
                return Err(Error::invalid(format!(
                    "toy setting `plant_dims` ({}) must be at least 1, and {} planted attributes × `plant_dims` must fit in `hidden_size` ({})",
                    self.plant_dims,
                    self.plant_attributes.len(),
                    self.hidden_size
                )));
            }
            if !(self.plant_weight > 0.0 && self.plant_weight.is_finite()) {
                return Err(Error::invalid(format!("toy setting `plant_weight` ({}) must be positive", self.plant_weight)));
            }
        }
        if !(self.lr > 0.0 && self.lr.is_finite() && self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(Error::invalid(format!("toy settings `lr` ({}) must be positive and `weight_decay` ({}) non-negative", self.lr, self.weight_decay)));
        }
        Ok(())
    }

    /// The HF configuration of the model.
    pub fn llama_config(&self, vocab_size: usize) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads,
            "head_dim": self.hidden_size / self.heads,
            "hidden_act": "silu",
            "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "tie_word_embeddings": false,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 2,
            "torch_dtype": "float32"
        })
    }
}
