//! PEFT prompt learning on the Llama family: prompt tuning, P-tuning and prefix tuning.
//!
//! The semantics are those of `PeftModelForCausalLM.forward` / `generate` in PEFT 0.21.2:
//!
//! - **prompt tuning / P-tuning** prepend `n_virtual` virtual token embeddings to the token embeddings; a passed
//!   attention mask gets `n_virtual` ones on the left; the logits **include** the virtual positions,
//!   `[B, n_virtual + L, V]`.
//! - **prefix tuning** feeds the `prompt_embeddings` `[P, layers·2·kv_heads·head_dim]` as per-layer past keys and
//!   values ([`PrefixKv::from_flat`], no RoPE on them); the real tokens take positions `P..P+L−1`, the mask is
//!   extended by `P` ones, and the logits cover the real tokens only, `[B, L, V]`.
//!
//! A saved adapter (`adapter_model.safetensors`) holds one tensor, `prompt_embeddings`: the virtual token
//! embeddings, or, for P-tuning and prefix tuning with `prefix_projection`, the **output** of the encoder. A
//! loaded adapter therefore uses those embeddings directly (PEFT does the same in inference mode); the encoders
//! (P-tuning MLP, prefix projection) exist only on adapters built here for training ([`PromptLearning::new`]).
//! Not implemented: `SAMPLE_VOCAB` init (refused with an error naming it) and the dropout between the layers of
//! the P-tuning LSTM in training.

use crate::llama::{ForwardInput, KvCache, LlamaForCausalLM, PrefixKv};
use candle_core::{D, DType, Device, IndexOp, Tensor, Var};
use indexmap::IndexMap;
use peft::config::PeftConfig;
use peft::host::{PromptAdapter, PromptAdapterSource};
use peft::tuners::p_tuning::config::PromptEncoderReparameterizationType;
use peft::tuners::prompt_tuning::config::PromptTuningInit;
use peft::{ForwardCtx, PeftError, PeftRng, Result};
use std::path::Path;

/// The saved tensor's key in `adapter_model.safetensors`.
pub const PROMPT_EMBEDDINGS_KEY: &str = "prompt_embeddings";

/// Which prompt-learning method an adapter uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptMethod {
    /// `PROMPT_TUNING`: trainable virtual token embeddings `[n_virtual, hidden]`.
    PromptTuning,
    /// `P_TUNING`: virtual token embeddings passed through an MLP encoder.
    PTuning,
    /// `PREFIX_TUNING`: per-layer past keys/values, optionally through a projection MLP.
    PrefixTuning,
}

/// The activation between the layers of an [`Encoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `torch.nn.ReLU` (P-tuning MLP head).
    Relu,
    /// `torch.nn.Tanh` (prefix projection).
    Tanh,
}

/// A stack of `torch.nn.Linear` layers with an activation between them (none after the last), as PEFT's
/// P-tuning `mlp_head` and prefix-tuning `transform`.
/// For P-tuning with `encoder_reparameterization_type: "LSTM"`, a bidirectional [`Lstm`] runs first.
#[derive(Clone, Debug)]
pub struct Encoder {
    /// The bidirectional LSTM before the MLP (P-tuning LSTM only).
    pub lstm: Option<Lstm>,
    /// `(weight [out, in], bias [out])` per layer, with their torch names (`mlp_head.0`, `transform.2`, ...).
    pub layers: Vec<(String, Var, Var)>,
    /// The activation between layers.
    pub activation: Activation,
}

/// One direction of one layer of a `torch.nn.LSTM`: gates in torch's order (input, forget, cell, output).
#[derive(Clone, Debug)]
pub struct LstmCell {
    /// `weight_ih` `[4H, in]`.
    pub w_ih: Var,
    /// `weight_hh` `[4H, H]`.
    pub w_hh: Var,
    /// `bias_ih` `[4H]`.
    pub b_ih: Var,
    /// `bias_hh` `[4H]`.
    pub b_hh: Var,
}

/// PEFT's P-tuning `lstm_head`: `torch.nn.LSTM(bidirectional=True, batch_first=True)` over the virtual tokens
/// as one sequence. The dropout between layers (`encoder_dropout`, training only) is not applied here.
#[derive(Clone, Debug)]
pub struct Lstm {
    /// Per layer, the forward and the reverse direction.
    pub layers: Vec<[LstmCell; 2]>,
    /// The hidden size `H`.
    pub hidden: usize,
}

impl Lstm {
    fn new(
        input: usize,
        hidden: usize,
        num_layers: usize,
        rng: &mut PeftRng,
        device: &Device,
    ) -> Result<Self> {
        // torch.nn.LSTM's init: every parameter U(−1/√H, 1/√H).
        let k = 1.0 / (hidden as f64).sqrt();
        let mut u = |shape: &[usize]| -> Result<Var> {
            Ok(Var::from_tensor(&rng.uniform_tensor(
                shape,
                -k,
                k,
                DType::F32,
                device,
            )?)?)
        };
        let mut layers = Vec::new();
        for l in 0..num_layers {
            let inp = if l == 0 { input } else { 2 * hidden };
            let mut cell = || -> Result<LstmCell> {
                Ok(LstmCell {
                    w_ih: u(&[4 * hidden, inp])?,
                    w_hh: u(&[4 * hidden, hidden])?,
                    b_ih: u(&[4 * hidden])?,
                    b_hh: u(&[4 * hidden])?,
                })
            };
            layers.push([cell()?, cell()?]);
        }
        Ok(Self { layers, hidden })
    }

    /// The output `[T, 2H]` (forward and reverse hidden states concatenated) for the sequence `x` `[T, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        let t_len = x.dim(0)?;
        let h_sz = self.hidden;
        for dirs in &self.layers {
            let mut outs = Vec::new();
            for (d, cell) in dirs.iter().enumerate() {
                // Input projections for every step at once: [T, 4H].
                let xi = x
                    .matmul(&cell.w_ih.as_tensor().t()?)?
                    .broadcast_add(cell.b_ih.as_tensor())?
                    .broadcast_add(cell.b_hh.as_tensor())?;
                let mut h = Tensor::zeros((1, h_sz), DType::F32, x.device())?;
                let mut c = h.clone();
                let mut hs = vec![None; t_len];
                let order: Vec<usize> = if d == 0 {
                    (0..t_len).collect()
                } else {
                    (0..t_len).rev().collect()
                };
                for t in order {
                    let g = xi
                        .narrow(0, t, 1)?
                        .add(&h.matmul(&cell.w_hh.as_tensor().t()?)?)?;
                    let i = candle_nn::ops::sigmoid(&g.narrow(1, 0, h_sz)?)?;
                    let f = candle_nn::ops::sigmoid(&g.narrow(1, h_sz, h_sz)?)?;
                    let gg = g.narrow(1, 2 * h_sz, h_sz)?.tanh()?;
                    let o = candle_nn::ops::sigmoid(&g.narrow(1, 3 * h_sz, h_sz)?)?;
                    c = (f.mul(&c)? + i.mul(&gg)?)?;
                    h = o.mul(&c.tanh()?)?;
                    hs[t] = Some(h.clone());
                }
                let hs: Vec<Tensor> = hs.into_iter().flatten().collect();
                outs.push(Tensor::cat(&hs, 0)?);
            }
            x = Tensor::cat(&outs, 1)?;
        }
        Ok(x)
    }

    /// The variables with torch's names (`lstm_head.weight_ih_l0`, `..._reverse`, ...).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for (l, dirs) in self.layers.iter().enumerate() {
            for (d, cell) in dirs.iter().enumerate() {
                let sfx = if d == 0 { "" } else { "_reverse" };
                for (what, var) in [
                    ("weight_ih", &cell.w_ih),
                    ("weight_hh", &cell.w_hh),
                    ("bias_ih", &cell.b_ih),
                    ("bias_hh", &cell.b_hh),
                ] {
                    v.push((format!("lstm_head.{what}_l{l}{sfx}"), var.clone()));
                }
            }
        }
        v
    }
}

impl Encoder {
    fn new(
        prefix: &str,
        dims: &[usize],
        activation: Activation,
        rng: &mut PeftRng,
        device: &Device,
    ) -> Result<Self> {
        let mut layers = Vec::new();
        for (i, w) in dims.windows(2).enumerate() {
            let (fan_in, fan_out) = (w[0], w[1]);
            // torch.nn.Linear's default init: U(−1/√fan_in, 1/√fan_in) for weight and bias.
            let bound = 1.0 / (fan_in as f64).sqrt();
            let weight =
                rng.uniform_tensor((fan_out, fan_in), -bound, bound, DType::F32, device)?;
            let bias = rng.uniform_tensor(fan_out, -bound, bound, DType::F32, device)?;
            layers.push((
                format!("{prefix}.{}", 2 * i),
                Var::from_tensor(&weight)?,
                Var::from_tensor(&bias)?,
            ));
        }
        Ok(Self {
            lstm: None,
            layers,
            activation,
        })
    }

    /// The encoder applied to `x` `[N, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = match &self.lstm {
            Some(l) => l.forward(x)?,
            None => x.clone(),
        };
        let n = self.layers.len();
        for (i, (_, w, b)) in self.layers.iter().enumerate() {
            x = x
                .matmul(&w.as_tensor().t()?)?
                .broadcast_add(b.as_tensor())?;
            if i + 1 < n {
                x = match self.activation {
                    Activation::Relu => x.relu()?,
                    Activation::Tanh => x.tanh()?,
                };
            }
        }
        Ok(x)
    }

    /// The trainable variables with their torch names (`mlp_head.0.weight`, `lstm_head.weight_ih_l0`, ...):
    /// the LSTM's first, then weight and bias per linear layer.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut v = self.lstm.as_ref().map(Lstm::named_vars).unwrap_or_default();
        for (name, w, b) in &self.layers {
            v.push((format!("{name}.weight"), w.clone()));
            v.push((format!("{name}.bias"), b.clone()));
        }
        v
    }

    /// The trainable variables, in [`named_vars`](Self::named_vars) order.
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }
}

/// A prompt-learning adapter for a [`LlamaForCausalLM`]: its config (model dimensions filled in as PEFT does),
/// its virtual token embeddings and, when built for training, its encoder.
#[derive(Clone, Debug)]
pub struct PromptLearning {
    config: PeftConfig,
    method: PromptMethod,
    /// The virtual token embeddings: the encoder's input when there is an encoder, else `prompt_embeddings`.
    embedding: Var,
    encoder: Option<Encoder>,
    num_layers: usize,
    kv_heads: usize,
    head_dim: usize,
}

fn method_of(config: &PeftConfig) -> Result<PromptMethod> {
    match config {
        PeftConfig::PromptTuning(_) => Ok(PromptMethod::PromptTuning),
        PeftConfig::PTuning(_) => Ok(PromptMethod::PTuning),
        PeftConfig::PrefixTuning(_) => Ok(PromptMethod::PrefixTuning),
        other => Err(PeftError::Invalid(format!(
            "{} is not a prompt-learning method",
            other.peft_type().as_str()
        ))),
    }
}

/// Fills in the model dimensions PEFT writes into a prompt-learning config (`_prepare_prompt_learning_config`):
/// `num_layers`, `token_dim` and `num_attention_heads` (for prefix tuning on a GQA model: the kv heads, and
/// `token_dim = kv_heads·head_dim`), `num_transformer_submodules = 1`, `encoder_hidden_size = token_dim` when
/// unset. Values already set are checked against the model.
fn prepare_config(config: &mut PeftConfig, model: &LlamaForCausalLM) -> Result<()> {
    let c = model.config();
    let prefix = matches!(config, PeftConfig::PrefixTuning(_));
    let gqa = c.num_key_value_heads != c.num_attention_heads;
    let (heads, token_dim) = if prefix && gqa {
        (c.num_key_value_heads, c.num_key_value_heads * c.head_dim)
    } else {
        (c.num_attention_heads, c.hidden_size)
    };
    let (p, enc_hidden) = match config {
        PeftConfig::PromptTuning(x) => (&mut x.prompt, None),
        PeftConfig::PTuning(x) => (&mut x.prompt, Some(&mut x.encoder_hidden_size)),
        PeftConfig::PrefixTuning(x) => (&mut x.prompt, Some(&mut x.encoder_hidden_size)),
        _ => unreachable!("checked by method_of"),
    };
    for (what, slot, want) in [
        ("num_layers", &mut p.num_layers, c.num_hidden_layers),
        ("token_dim", &mut p.token_dim, token_dim),
        ("num_attention_heads", &mut p.num_attention_heads, heads),
        (
            "num_transformer_submodules",
            &mut p.num_transformer_submodules,
            1,
        ),
    ] {
        match *slot {
            None => *slot = Some(want),
            Some(v) if v == want => {}
            Some(v) => {
                return Err(PeftError::InvalidConfig(format!(
                    "`{what}` is {v} in the adapter config but the model needs {want}"
                )));
            }
        }
    }
    if let Some(h) = enc_hidden {
        h.get_or_insert(token_dim);
    }
    Ok(())
}

impl PromptLearning {
    /// A new adapter for training, initialised as PEFT's `get_peft_model` does: prompt tuning RANDOM = N(0, 1),
    /// TEXT = the model's embeddings of `init_text_ids` (the tokenized `prompt_tuning_init_text`, special tokens
    /// included as the tokenizer adds them), repeated and cut to `num_virtual_tokens`; P-tuning: embedding
    /// N(0, 1) and the MLP head `token_dim → h → h → token_dim` (ReLU) with torch's Linear init (LSTM: a
    /// bidirectional `encoder_num_layers`-layer LSTM of width h, then `2h → 2h → token_dim`); prefix tuning:
    /// embedding N(0, 1) (zeros with `init_weights: "zero"`), with `prefix_projection` the transform
    /// `token_dim → h → layers·2·token_dim` (Tanh). Draws come from `rng` (not torch's generator).
    pub fn new(
        config: &PeftConfig,
        model: &LlamaForCausalLM,
        rng: &mut PeftRng,
        init_text_ids: Option<&[u32]>,
    ) -> Result<Self> {
        let method = method_of(config)?;
        config.validate()?;
        let mut config = config.clone();
        prepare_config(&mut config, model)?;
        let device = model.device().clone();
        let c = model.config();
        let (n, token_dim) = {
            let p = prompt_base(&config);
            (
                p.num_virtual_tokens.unwrap_or_default(),
                p.token_dim.unwrap_or_default(),
            )
        };
        let (embedding, encoder) = match &config {
            PeftConfig::PromptTuning(pt) => {
                let e = match pt.prompt_tuning_init {
                    PromptTuningInit::Random => {
                        rng.normal_tensor((n, token_dim), 0.0, 1.0, DType::F32, &device)?
                    }
                    PromptTuningInit::Text => {
                        let ids = init_text_ids.filter(|i| !i.is_empty()).ok_or_else(|| {
                            PeftError::InvalidConfig(
                                "prompt_tuning_init TEXT needs the tokenized prompt_tuning_init_text"
                                    .into(),
                            )
                        })?;
                        let ids: Vec<u32> = ids.iter().copied().cycle().take(n).collect();
                        let ids = Tensor::new(ids.as_slice(), &device)?.unsqueeze(0)?;
                        model
                            .embed_tokens(&ids, &ForwardCtx::eval())?
                            .squeeze(0)?
                            .to_dtype(DType::F32)?
                            .detach()
                    }
                    PromptTuningInit::SampleVocab => {
                        return Err(PeftError::Unsupported {
                            field: "prompt_tuning_init".into(),
                            value: "\"SAMPLE_VOCAB\"".into(),
                            reason: "not implemented yet (use RANDOM or TEXT)".into(),
                        });
                    }
                };
                (e, None)
            }
            PeftConfig::PTuning(pt) => {
                let h = pt.encoder_hidden_size.unwrap_or(token_dim);
                let e = rng.normal_tensor((n, token_dim), 0.0, 1.0, DType::F32, &device)?;
                let enc = match pt.encoder_reparameterization_type {
                    PromptEncoderReparameterizationType::Mlp => Encoder::new(
                        "mlp_head",
                        &[token_dim, h, h, token_dim],
                        Activation::Relu,
                        rng,
                        &device,
                    )?,
                    PromptEncoderReparameterizationType::Lstm => {
                        let lstm = Lstm::new(token_dim, h, pt.encoder_num_layers, rng, &device)?;
                        let mut enc = Encoder::new(
                            "mlp_head",
                            &[2 * h, 2 * h, token_dim],
                            Activation::Relu,
                            rng,
                            &device,
                        )?;
                        enc.lstm = Some(lstm);
                        enc
                    }
                };
                (e, Some(enc))
            }
            PeftConfig::PrefixTuning(pt) => {
                let zero = pt.init_weights.as_deref() == Some("zero");
                let flat = c.num_hidden_layers * 2 * token_dim;
                if pt.prefix_projection {
                    let h = pt.encoder_hidden_size.unwrap_or(token_dim);
                    let e = rng.normal_tensor((n, token_dim), 0.0, 1.0, DType::F32, &device)?;
                    let enc = Encoder::new(
                        "transform",
                        &[token_dim, h, flat],
                        Activation::Tanh,
                        rng,
                        &device,
                    )?;
                    if zero {
                        let (_, w, b) = enc.layers.last().expect("two layers");
                        w.set(&w.zeros_like()?)?;
                        b.set(&b.zeros_like()?)?;
                    }
                    (e, Some(enc))
                } else if zero {
                    (Tensor::zeros((n, flat), DType::F32, &device)?, None)
                } else {
                    (
                        rng.normal_tensor((n, flat), 0.0, 1.0, DType::F32, &device)?,
                        None,
                    )
                }
            }
            _ => unreachable!(),
        };
        Ok(Self {
            config,
            method,
            embedding: Var::from_tensor(&embedding)?,
            encoder,
            num_layers: c.num_hidden_layers,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        })
    }

    /// Loads an adapter directory saved by PEFT (or by [`save`](Self::save)) for `model`: the config and the
    /// single tensor `prompt_embeddings`, checked against the model's dimensions. Encoders are not rebuilt: the
    /// file holds their output.
    pub fn load(dir: impl AsRef<Path>, model: &LlamaForCausalLM) -> Result<Self> {
        let dir = dir.as_ref();
        let file = peft::io::load_adapter(dir, model.device())?;
        Self::from_tensors(&file.config, &file.tensors, dir, model)
    }

    /// [`load`](Self::load) from an adapter directory already read: its config and the tensors of its
    /// `adapter_model.safetensors` (`dir` only names it in errors).
    pub fn from_tensors(
        config: &PeftConfig,
        tensors: &IndexMap<String, Tensor>,
        dir: &Path,
        model: &LlamaForCausalLM,
    ) -> Result<Self> {
        let method = method_of(config)?;
        let mut config = config.clone();
        prepare_config(&mut config, model)?;
        let file_tensors = tensors;
        let Some(t) = file_tensors.get(PROMPT_EMBEDDINGS_KEY) else {
            return Err(PeftError::Invalid(format!(
                "{}: adapter_model.safetensors has no `{PROMPT_EMBEDDINGS_KEY}` (keys: {:?})",
                dir.display(),
                file_tensors.keys().collect::<Vec<_>>()
            )));
        };
        if file_tensors.len() != 1 {
            return Err(PeftError::UnexpectedKeys(
                file_tensors
                    .keys()
                    .filter(|k| *k != PROMPT_EMBEDDINGS_KEY)
                    .cloned()
                    .collect(),
            ));
        }
        let c = model.config();
        let p = prompt_base(&config);
        let n = p.num_virtual_tokens.unwrap_or_default();
        let token_dim = p.token_dim.unwrap_or_default();
        let width = match method {
            PromptMethod::PrefixTuning => c.num_hidden_layers * 2 * token_dim,
            _ => token_dim,
        };
        if t.dims() != [n, width] {
            return Err(PeftError::ShapeMismatch {
                name: format!("{}: {PROMPT_EMBEDDINGS_KEY}", dir.display()),
                expected: vec![n, width],
                got: t.dims().to_vec(),
            });
        }
        Ok(Self {
            config,
            method,
            embedding: Var::from_tensor(&t.to_dtype(DType::F32)?)?,
            encoder: None,
            num_layers: c.num_hidden_layers,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        })
    }

    /// The config, model dimensions filled in.
    pub fn config(&self) -> &PeftConfig {
        &self.config
    }

    /// The method.
    pub fn method(&self) -> PromptMethod {
        self.method
    }

    /// The number of virtual tokens (prefix length for prefix tuning).
    pub fn num_virtual_tokens(&self) -> usize {
        self.embedding.as_tensor().dim(0).unwrap_or_default()
    }

    /// The encoder, on adapters built by [`new`](Self::new) for P-tuning or prefix projection.
    pub fn encoder(&self) -> Option<&Encoder> {
        self.encoder.as_ref()
    }

    /// The virtual token embeddings (the encoder's input when there is one).
    pub fn embedding(&self) -> &Var {
        &self.embedding
    }

    /// The trainable variables: the embedding, then the encoder's weights and biases.
    pub fn vars(&self) -> Vec<Var> {
        let mut v = vec![self.embedding.clone()];
        if let Some(e) = &self.encoder {
            v.extend(e.vars());
        }
        v
    }

    /// The trainable variables with PEFT's names (`prompt_encoder.default.embedding.weight`,
    /// `prompt_encoder.default.mlp_head.0.weight`, ...), as an optimizer or checkpoint wants them.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut v = vec![(
            "prompt_encoder.default.embedding.weight".to_string(),
            self.embedding.clone(),
        )];
        if let Some(e) = &self.encoder {
            for (name, var) in e.named_vars() {
                v.push((format!("prompt_encoder.default.{name}"), var));
            }
        }
        v
    }

    /// The number of trainable parameters.
    pub fn num_trainable_params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// `prompt_embeddings` as PEFT saves them (`get_prompt_embedding_to_save`): the encoder's output, or the
    /// embeddings. Differentiable. `[n_virtual, token_dim]` or, for prefix tuning, `[P, layers·2·token_dim]`.
    pub fn prompt_embeddings(&self) -> Result<Tensor> {
        let e = self.embedding.as_tensor();
        match &self.encoder {
            Some(enc) => enc.forward(e),
            None => Ok(e.clone()),
        }
    }

    /// The prefix keys/values (prefix tuning only).
    pub fn prefix_kv(&self, dtype: DType) -> Result<PrefixKv> {
        if self.method != PromptMethod::PrefixTuning {
            return Err(PeftError::Invalid(
                "prefix_kv is for prefix tuning only".into(),
            ));
        }
        PrefixKv::from_flat(
            &self.prompt_embeddings()?.to_dtype(dtype)?,
            self.num_layers,
            self.kv_heads,
            self.head_dim,
        )
    }

    /// Writes the adapter directory as PEFT does: `adapter_config.json` and `adapter_model.safetensors` with the
    /// single key `prompt_embeddings` (f32).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let t = self.prompt_embeddings()?.detach().contiguous()?;
        peft::io::save_adapter(dir, &self.config, &[(PROMPT_EMBEDDINGS_KEY.to_string(), t)])
    }

    /// `attention_mask` `[B, L]` with `n` ones prepended (any integer or float dtype; kept).
    fn extend_mask(mask: &Tensor, n: usize) -> Result<Tensor> {
        let b = mask.dim(0)?;
        let ones = Tensor::ones((b, n), mask.dtype(), mask.device())?;
        Ok(Tensor::cat(&[&ones, mask], 1)?)
    }

    /// The inputs embeddings with the virtual tokens prepended, `[B, n + L, hidden]` (prompt / P-tuning).
    fn prepend(&self, model: &LlamaForCausalLM, ids: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let tok = model.embed_tokens(ids, ctx)?;
        let b = ids.dim(0)?;
        let prompt = self.prompt_embeddings()?.to_dtype(tok.dtype())?;
        let (n, h) = prompt.dims2()?;
        let prompt = prompt.unsqueeze(0)?.broadcast_as((b, n, h))?;
        Ok(Tensor::cat(&[&prompt, &tok], 1)?)
    }

    /// PEFT's forward: logits `[B, n_virtual + L, V]` for prompt / P-tuning, `[B, L, V]` for prefix tuning.
    /// `attention_mask` is `[B, L]` over the real tokens only (ones are prepended here).
    pub fn forward(
        &self,
        model: &LlamaForCausalLM,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        self.forward_with_cache(model, input_ids, attention_mask, None, ctx)
    }

    /// The logits of the real tokens only, `[B, L, V]`, for every method (prompt / P-tuning: the virtual
    /// positions cut off). With labels shifted as usual this is PEFT's loss, whose labels are −100 on the virtual
    /// positions.
    pub fn token_logits(
        &self,
        model: &LlamaForCausalLM,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let logits = self.forward(model, input_ids, attention_mask, ctx)?;
        match self.method {
            PromptMethod::PrefixTuning => Ok(logits),
            _ => {
                let n = self.num_virtual_tokens();
                let l = input_ids.dim(1)?;
                Ok(logits.narrow(1, n, l)?)
            }
        }
    }

    /// [`forward`](Self::forward), filling `cache` (which must be empty) with the virtual tokens / prefix and the
    /// inputs, for decoding on with [`LlamaForCausalLM::forward`] and the cache alone.
    pub fn forward_with_cache(
        &self,
        model: &LlamaForCausalLM,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        if cache.as_ref().is_some_and(|c| !c.is_empty()) {
            return Err(PeftError::Invalid(
                "the cache must be empty when the virtual tokens are prepended".into(),
            ));
        }
        let n = self.num_virtual_tokens();
        let mask = attention_mask
            .map(|m| Self::extend_mask(m, n))
            .transpose()?;
        match self.method {
            PromptMethod::PrefixTuning => {
                let prefix = self.prefix_kv(model.dtype())?;
                let mut input = ForwardInput::ids(input_ids).with_prefix(&prefix);
                if let Some(m) = &mask {
                    input = input.with_attention_mask(m);
                }
                if let Some(c) = cache {
                    input = input.with_cache(c);
                }
                model.forward(input, ctx)
            }
            PromptMethod::PromptTuning | PromptMethod::PTuning => {
                let embeds = self.prepend(model, input_ids, ctx)?;
                let mut input = ForwardInput::embeds(&embeds);
                if let Some(m) = &mask {
                    input = input.with_attention_mask(m);
                }
                if let Some(c) = cache {
                    input = input.with_cache(c);
                }
                model.forward(input, ctx)
            }
        }
    }

    /// Greedy decoding of one prompt `[L]` for up to `max_new_tokens` (stopping after `eos`), through the KV
    /// cache: the first step runs the virtual tokens / prefix and the prompt, later steps one token each.
    /// Returns the new tokens.
    pub fn generate_greedy(
        &self,
        model: &LlamaForCausalLM,
        prompt: &[u32],
        max_new_tokens: usize,
        eos: Option<u32>,
    ) -> Result<Vec<u32>> {
        let ctx = ForwardCtx::eval();
        let device = model.device();
        let mut cache = KvCache::new();
        let ids = Tensor::new(prompt, device)?.unsqueeze(0)?;
        let mut logits = self.forward_with_cache(model, &ids, None, Some(&mut cache), &ctx)?;
        let mut out = Vec::new();
        for _ in 0..max_new_tokens {
            let last = logits.i((0, logits.dim(1)? - 1))?;
            let next = last.argmax(D::Minus1)?.to_scalar::<u32>()?;
            out.push(next);
            if Some(next) == eos || out.len() == max_new_tokens {
                break;
            }
            let step = Tensor::new(&[next], device)?.unsqueeze(0)?;
            logits = model.forward(ForwardInput::ids(&step).with_cache(&mut cache), &ctx)?;
        }
        Ok(out)
    }
}

fn prompt_base(config: &PeftConfig) -> &peft::config::PromptLearningBase {
    match config {
        PeftConfig::PromptTuning(x) => &x.prompt,
        PeftConfig::PTuning(x) => &x.prompt,
        PeftConfig::PrefixTuning(x) => &x.prompt,
        _ => unreachable!("prompt-learning configs only"),
    }
}

impl PromptAdapter for PromptLearning {
    fn config(&self) -> &PeftConfig {
        &self.config
    }

    fn named_vars(&self) -> Vec<(String, Var)> {
        PromptLearning::named_vars(self)
    }

    fn state_dict(&self) -> Result<Vec<(String, Tensor)>> {
        let t = self.prompt_embeddings()?.detach().contiguous()?;
        Ok(vec![(PROMPT_EMBEDDINGS_KEY.to_string(), t)])
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// The Llama family's [`peft::host::AdapterHost::prompt_adapter`]: a [`PromptLearning`], new
/// ([`PromptLearning::new`]) or from saved tensors ([`PromptLearning::from_tensors`]).
pub(crate) fn host_prompt_adapter(
    model: &LlamaForCausalLM,
    config: &PeftConfig,
    source: PromptAdapterSource<'_>,
) -> Result<Box<dyn PromptAdapter>> {
    Ok(Box::new(match source {
        PromptAdapterSource::New { rng, init_text_ids } => {
            PromptLearning::new(config, model, rng, init_text_ids)?
        }
        PromptAdapterSource::Saved { tensors, dir } => {
            PromptLearning::from_tensors(config, tensors, dir, model)?
        }
    }))
}

/// The prompt-learning adapter of `model`, if it has one (a [`PromptLearning`] attached by
/// [`peft::PeftModel::get_peft_model`], [`peft::PeftModel::from_pretrained`] or
/// [`peft::PeftModel::load_adapter`]).
///
/// Prompt learning attaches like any other method; the forward of [`crate::causal_lm::CausalLm`] (and so
/// [`crate::eval::evaluate`], [`crate::generate::generate`], [`crate::train::train`]) runs it:
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use peft::{ForwardCtx, PeftConfig, PeftModel};
/// use peft_models::causal_lm::CausalLm;
/// use peft_models::llama::{LlamaConfig, LlamaForCausalLM};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = LlamaConfig::from_value(&serde_json::json!({
///     "model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
///     "num_key_value_heads": 1, "vocab_size": 20,
/// }))?;
/// let tensors = LlamaForCausalLM::random_tensors(&config, 0, DType::F32, &Device::Cpu)?;
/// let base = || LlamaForCausalLM::from_tensors(config.clone(), tensors.clone(), &Device::Cpu);
/// let prefix = PeftConfig::from_json_value(serde_json::json!({
///     "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3,
/// }))?;
/// let model = PeftModel::get_peft_model(base()?, prefix, "default", 0)?;
/// let pl = peft_models::prompt_learning::prompt_learning_of(&model).expect("attached");
/// assert_eq!(pl.num_virtual_tokens(), 3);
/// let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu)?;
/// let logits = model.token_logits(&ids, None, &ForwardCtx::eval())?;
/// assert_eq!(logits.dims(), &[1, 4, 20]);
///
/// // Saved in PEFT's format (`prompt_embeddings`), loaded back through the same entry point.
/// let dir = tempfile::tempdir()?;
/// model.save_pretrained(dir.path())?;
/// let back = PeftModel::from_pretrained(base()?, dir.path(), "default", &Device::Cpu)?;
/// let again = back.token_logits(&ids, None, &ForwardCtx::eval())?;
/// assert!((again - logits)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? < 1e-5);
/// # Ok(()) }
/// ```
pub fn prompt_learning_of(model: &peft::PeftModel<LlamaForCausalLM>) -> Option<&PromptLearning> {
    model
        .prompt_adapter()
        .and_then(|p| p.as_any().downcast_ref::<PromptLearning>())
}

/// The token ids PEFT initialises a `TEXT` prompt-tuning adapter from: `prompt_tuning_init_text` encoded with
/// special tokens (PEFT uses `tokenizer_name_or_path`; this uses the model's tokenizer). `None` for every
/// other config; an error when the text is missing.
pub fn init_text_ids(
    config: &PeftConfig,
    tokenizer: Option<&crate::tokenizer::Tokenizer>,
) -> crate::error::Result<Option<Vec<u32>>> {
    match config {
        PeftConfig::PromptTuning(c) if c.prompt_tuning_init == PromptTuningInit::Text => {
            let Some(text) = &c.prompt_tuning_init_text else {
                return Err(crate::error::ModelError::Invalid(
                    "prompt_tuning_init TEXT needs `prompt_tuning_init_text`".into(),
                ));
            };
            let tok = tokenizer.ok_or_else(|| {
                crate::error::ModelError::Invalid(
                    "prompt_tuning_init TEXT needs a tokenizer, and the model has none (no tokenizer.json)"
                        .into(),
                )
            })?;
            Ok(Some(tok.encode(text, true)?))
        }
        _ => Ok(None),
    }
}
