//! The fuzz targets: each a loader of peft-rs fed the bytes of one input, with its seeds from the
//! repository's fixtures.

use candle_core::{Device, Tensor};
use indexmap::IndexMap;
use peft::ForwardCtx;
use peft::config::PeftConfig;
use peft::peft_model::PeftModel;
use peft_models::data::{DataConfig, load_dataset};
use peft_models::llama::{ForwardInput, LlamaConfig, LlamaForCausalLM};
use peft_models::tokenizer::{ChatMessage, Tokenizer, render_chat_template};
use std::path::{Path, PathBuf};

/// A loader run on one input: `Ok` if it accepted it, `Err(message)` if it refused it. A panic is a crash.
pub type Runner = Box<dyn FnMut(&[u8]) -> Result<(), String>>;

/// One fuzz target.
#[derive(Clone, Copy)]
pub struct Target {
    /// Its name (`peft-fuzz --target NAME`).
    pub name: &'static str,
    /// What it feeds the input to.
    pub about: &'static str,
    /// The seed inputs.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// A fresh loader (with its scratch directory and any model it loads into).
    pub make: fn() -> Runner,
    /// The length of the prefix where byte mutations should mostly land (a binary header), or 0.
    pub hot: fn(&[u8]) -> usize,
    /// The longest input tried.
    pub max_len: usize,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("name", &self.name).finish()
    }
}

/// Every target, in the order `peft-fuzz` runs them.
pub fn all() -> Vec<Target> {
    vec![
        Target {
            name: "adapter_config",
            about: "PeftConfig::from_json_str (adapter_config.json), and a reload of what it writes back",
            seeds: adapter_config_seeds,
            make: adapter_config_runner,
            hot: no_hot,
            max_len: 64 << 10,
        },
        Target {
            name: "safetensors",
            about: "SafetensorsFile::open and the load of every tensor it lists",
            seeds: safetensors_seeds,
            make: safetensors_runner,
            hot: safetensors_hot,
            max_len: 256 << 10,
        },
        Target {
            name: "adapter",
            about: "PeftModel::load_adapter into a tiny Llama (config and weights), then a forward",
            seeds: adapter_seeds,
            make: adapter_runner,
            hot: no_hot,
            max_len: 256 << 10,
        },
        Target {
            name: "gguf",
            about: "gguf::read_content (header and tensor infos), the tokenizer from its metadata, load_gguf",
            seeds: gguf_seeds,
            make: gguf_runner,
            hot: gguf_hot,
            max_len: 512 << 10,
        },
        Target {
            name: "data",
            about: "data::load_dataset on a .jsonl (or, for some inputs, .txt) file with a SentencePiece tokenizer",
            seeds: data_seeds,
            make: data_runner,
            hot: no_hot,
            max_len: 16 << 10,
        },
        Target {
            name: "chat_template",
            about: "tokenizer::render_chat_template on a template and a JSON list of messages",
            seeds: chat_seeds,
            make: chat_runner,
            hot: no_hot,
            max_len: 16 << 10,
        },
    ]
}

/// The target called `name`.
pub fn by_name(name: &str) -> Option<Target> {
    all().into_iter().find(|t| t.name == name)
}

/// The repository's `fixtures/` directory.
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn no_hot(_: &[u8]) -> usize {
    0
}

/// Files under `dir` (recursively) named `name`, sorted, at most `max_size` bytes each; the bad-input corpus
/// (`fixtures/bad/`) is left out, as seeds are meant to be valid.
fn find(dir: &Path, name: &str, max_size: u64, out: &mut Vec<PathBuf>) {
    if dir.ends_with("fixtures/bad") {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            find(&p, name, max_size, out);
        } else if p.file_name().is_some_and(|n| n == name)
            && p.metadata().is_ok_and(|m| m.len() <= max_size)
        {
            out.push(p);
        }
    }
}

fn files(name: &str, max_size: u64) -> Vec<PathBuf> {
    let mut out = Vec::new();
    find(&fixtures(), name, max_size, &mut out);
    out
}

fn read_all(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    let mut seen = std::collections::HashSet::new();
    paths
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .filter(|b| seen.insert(b.clone()))
        .collect()
}

/// A scratch directory on a RAM disk where there is one.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::Builder::new().prefix("peft-fuzz").tempdir_in(shm)
    {
        return d;
    }
    tempfile::Builder::new()
        .prefix("peft-fuzz")
        .tempdir()
        .expect("a temporary directory")
}

/// An error message with the scratch directory's path taken out (it differs from run to run).
fn message(e: impl std::fmt::Display, dir: &Path) -> String {
    e.to_string().replace(&dir.display().to_string(), "<dir>")
}

/// `input` cut at the first `sep`: the part before and the part after (empty when there is no `sep`).
fn split<'a>(input: &'a [u8], sep: &[u8]) -> (&'a [u8], &'a [u8]) {
    match input.windows(sep.len()).position(|w| w == sep) {
        Some(i) => (&input[..i], &input[i + sep.len()..]),
        None => (input, &[]),
    }
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("writing a scratch file");
}

// ---- adapter_config.json --------------------------------------------------------------------------------

fn adapter_config_seeds() -> Vec<Vec<u8>> {
    read_all(&files("adapter_config.json", 64 << 10))
}

fn adapter_config_runner() -> Runner {
    Box::new(|input| {
        let text = String::from_utf8_lossy(input);
        let config = PeftConfig::from_json_str(&text).map_err(|e| e.to_string())?;
        let written = config.to_json_string();
        if let Err(e) = PeftConfig::from_json_str(&written) {
            panic!("a config that loads must reload from what it writes: {e}\n{written}");
        }
        Ok(())
    })
}

// ---- safetensors ----------------------------------------------------------------------------------------

fn safetensors_seeds() -> Vec<Vec<u8>> {
    let mut p = files("adapter_model.safetensors", 24 << 10);
    p.truncate(24);
    p.extend(files("model.safetensors", 128 << 10).into_iter().take(2));
    read_all(&p)
}

/// The 8-byte length and the JSON header.
fn safetensors_hot(b: &[u8]) -> usize {
    let n = b
        .get(..8)
        .map(|x| u64::from_le_bytes(x.try_into().unwrap_or_default()))
        .unwrap_or(0);
    (8 + n.min(b.len() as u64) as usize).min(b.len())
}

fn safetensors_runner() -> Runner {
    let dir = scratch();
    Box::new(move |input| {
        let path = dir.path().join("x.safetensors");
        write(&path, input);
        let f = peft::io::SafetensorsFile::open(&path).map_err(|e| message(e, dir.path()))?;
        for name in f.names() {
            f.load(&name, &Device::Cpu)
                .map_err(|e| message(e, dir.path()))?;
        }
        Ok(())
    })
}

// ---- adapter directories --------------------------------------------------------------------------------

/// Between the config and the weights in an adapter input.
pub const WEIGHTS_SEP: &[u8] = b"\n#~adapter_model.safetensors~#\n";

/// The tiny Llama the adapters of `lora/cases/llama_qv` were trained for.
fn tiny_llama() -> (LlamaConfig, IndexMap<String, Tensor>) {
    let dir = fixtures().join("lora/cases/llama_qv/base_hf");
    let config = LlamaConfig::from_file(dir.join("config.json")).expect("the tiny Llama's config");
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .expect("the tiny Llama's weights");
    let mut names: Vec<_> = tensors.keys().cloned().collect();
    names.sort();
    let mut tensors = tensors;
    let tensors = names
        .into_iter()
        .filter_map(|n| tensors.remove(&n).map(|t| (n, t)))
        .collect();
    (config, tensors)
}

fn adapter_seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    // adapters of tiny Llamas of the same shape (hidden 32, 2 layers, vocab 64): LoRA, and one of each of the
    // newer layer methods (not GLoRA's: its fixture's base has biases, so its `glora_C` … `glora_E` do not fit
    // the bias-free base this target loads them into)
    for case in [
        "lora/cases/llama_qv",
        "lora/cases/llama_all_linear",
        "lora/cases/llama_two_adapters",
        "hra/cases/hra_llama",
        "road/cases/road_4_llama",
        "delora/cases/delora_llama",
        "miss/cases/miss_llama",
        "gralora/cases/gralora_llama",
        "c3a/cases/c3a_llama",
        "hira/cases/hira_llama",
        "beft/cases/beft_llama",
        "vblora/cases/vblora_llama",
        "fourierft/cases/fourierft_llama",
        "peanut/cases/peanut_llama",
        "supertuning/cases/supertuning_llama",
        "shira/cases/shira_llama",
        "pvera/cases/pvera_llama",
        "randlora/cases/randlora_llama",
        "trainable_tokens/cases/tt_llama",
        "deft/cases/deft_llama",
        "unilora/cases/unilora_llama",
        "frod/cases/frod_llama",
        "osf/cases/osf_llama",
    ] {
        let dir = fixtures().join(case).join("adapter");
        if let (Ok(c), Ok(w)) = (
            std::fs::read(dir.join("adapter_config.json")),
            std::fs::read(dir.join("adapter_model.safetensors")),
        ) {
            out.push([c.as_slice(), WEIGHTS_SEP, w.as_slice()].concat());
        }
    }
    out
}

fn adapter_runner() -> Runner {
    let dir = scratch();
    let (config, tensors) = tiny_llama();
    let ids = Tensor::new(&[[1u32, 5, 9, 17]], &Device::Cpu).expect("ids");
    Box::new(move |input| {
        let (cfg, weights) = split(input, WEIGHTS_SEP);
        let d = dir.path();
        write(&d.join("adapter_config.json"), cfg);
        write(&d.join("adapter_model.safetensors"), weights);
        let base = LlamaForCausalLM::from_tensors(config.clone(), tensors.clone(), &Device::Cpu)
            .expect("the tiny Llama");
        let mut pm = PeftModel::new(base, 0);
        pm.load_adapter(d, "fuzz", &Device::Cpu)
            .map_err(|e| message(e, d))?;
        pm.model()
            .forward(ForwardInput::ids(&ids), &ForwardCtx::inference())
            .map_err(|e| message(e, d))?;
        pm.delete_adapter("fuzz").map_err(|e| message(e, d))?;
        Ok(())
    })
}

// ---- GGUF -----------------------------------------------------------------------------------------------

fn gguf_seeds() -> Vec<Vec<u8>> {
    let mut p = vec![fixtures().join("quant/cases/gguf_blocks/model.gguf")];
    let mut lora = Vec::new();
    find(
        &fixtures().join("gguf_lora"),
        "converter_q8_0.gguf",
        64 << 10,
        &mut lora,
    );
    p.extend(lora.into_iter().take(2));
    read_all(&p)
}

/// The header of these files ends within 8 KiB.
fn gguf_hot(b: &[u8]) -> usize {
    b.len().min(8 << 10)
}

fn gguf_runner() -> Runner {
    let dir = scratch();
    Box::new(move |input| {
        let d = dir.path();
        let path = d.join("model.gguf");
        write(&path, input);
        let (content, _) = peft_models::gguf::read_content(&path).map_err(|e| message(e, d))?;
        // the tokenizer may be refused on its own; the model's load goes on
        let _ = Tokenizer::from_gguf_metadata(&content.metadata);
        let model = peft_models::gguf::load_gguf(&path, &Device::Cpu).map_err(|e| message(e, d))?;
        LlamaConfig::from_value(&model.config).map_err(|e| message(e, d))?;
        Ok(())
    })
}

// ---- data files -----------------------------------------------------------------------------------------

fn data_seeds() -> Vec<Vec<u8>> {
    let lines: &[&str] = &[
        r#"{"input_ids": [1, 5, 9, 17, 33, 2]}"#,
        r#"{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}"#,
        r#"{"text": "the quick brown fox"}"#,
        r#"{"prompt": "2+2=", "completion": "4"}"#,
        r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}"#,
    ];
    let mut out: Vec<Vec<u8>> = lines
        .iter()
        .map(|l| format!("{l}\n{l}\n").into_bytes())
        .collect();
    out.push(b"Plain text, a document of its own.\nA second line.\n".to_vec());
    out
}

fn data_runner() -> Runner {
    let dir = scratch();
    let gguf = fixtures().join("quant/cases/gguf_blocks/model.gguf");
    let (content, _) = peft_models::gguf::read_content(&gguf).expect("the fixture GGUF");
    let tok = Tokenizer::from_gguf_metadata(&content.metadata).expect("the fixture's tokenizer");
    let config = DataConfig::new(16).with_vocab_size(tok.vocab_size());
    Box::new(move |input| {
        let d = dir.path();
        // every fifth input is read as plain text, the others as JSON lines
        let path = d.join(if input.len() % 5 == 0 {
            "data.txt"
        } else {
            "data.jsonl"
        });
        write(&path, input);
        let r = load_dataset(&path, Some(&tok), &config).map_err(|e| message(e, d));
        let _ = std::fs::remove_file(&path);
        r.map(|_| ())
    })
}

// ---- chat templates -------------------------------------------------------------------------------------

/// Between the template and the messages in a chat input.
pub const MESSAGES_SEP: &[u8] = b"\n#~messages~#\n";

const TEMPLATES: &[&str] = &[
    // SmolLM2's
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    // Llama-2 style, with raise_exception and string methods
    "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'].strip() + ' [/INST]' }}{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
    // Llama-3 style, with strftime_now, set and filters
    "{%- set date_string = strftime_now('%d %b %Y') -%}{{- bos_token }}{{- '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + date_string + '<|eot_id|>' }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}",
    // tojson, loops over items, slicing, upper
    "{% for m in messages[-3:] %}[{{ m.role | upper }}] {{ m.content | tojson(indent=2) }}{% if not loop.last %} | {% endif %}{% endfor %}{{ messages | length }}{{ {'a': [1, 2.5, none, true]} | tojson }}",
];

fn chat_seeds() -> Vec<Vec<u8>> {
    let with_system = r#"[{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": " Ünïcödé ✓ \"q\" "}]"#;
    // the Llama-2 template wants user and assistant turns alternating from the first message
    let alternating = r#"[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]"#;
    TEMPLATES
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let m = if i == 1 { alternating } else { with_system };
            [t.as_bytes(), MESSAGES_SEP, m.as_bytes()].concat()
        })
        .collect()
}

fn chat_runner() -> Runner {
    let special = IndexMap::from([
        ("bos_token".to_string(), "<s>".to_string()),
        ("eos_token".to_string(), "</s>".to_string()),
    ]);
    let fallback = vec![ChatMessage {
        role: "user".into(),
        content: "hi".into(),
    }];
    Box::new(move |input| {
        let (template, msgs) = split(input, MESSAGES_SEP);
        let template = String::from_utf8_lossy(template);
        let messages: Vec<ChatMessage> =
            serde_json::from_slice(msgs).unwrap_or_else(|_| fallback.clone());
        render_chat_template(&template, &messages, input.len() % 2 == 0, &special)
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
}
