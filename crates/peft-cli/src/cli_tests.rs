//! In-process tests of `peft train`, `eval`, `generate` and `convert` on a tiny random Llama written into a
//! temporary directory (word-level tokenizer built in code, no download).

use crate::{Cli, error_report, run_with};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use peft_models::llama::{LlamaConfig, LlamaForCausalLM};
use peft_models::tokenizer::Tokenizer;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
                      message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt \
                      %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const SPECIAL: [&str; 5] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"];
const WORDS: [&str; 24] = [
    "hello",
    "world",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "user",
    "assistant",
    "system",
    "hi",
    "there",
    "how",
    "are",
    "you",
    "fine",
    "thanks",
    "be",
    "brief",
    "bot",
    ".",
    "?",
    "!",
    ",",
];

/// The sentences of the training text (every word in [`WORDS`]).
const SENTENCES: [&str; 5] = [
    "the cat sat on the mat .",
    "hello world , how are you ?",
    "fine , thanks ! the cat sat on the mat .",
    "hi there , bot ! be brief .",
    "how are you , cat ? fine , thanks .",
];

/// A tiny model directory and its training text, alive as long as the value.
struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    model: PathBuf,
    data: PathBuf,
}

impl Fixture {
    /// A fresh path under the fixture's directory.
    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }
}

/// The `tokenizer.json` of a word-level tokenizer: ids 0..5 are `<unk> <s> </s> <|im_start|> <|im_end|>`
/// (special), then [`WORDS`]; whitespace separates words, punctuation is its own token.
fn tokenizer_json() -> Value {
    let mut vocab = serde_json::Map::new();
    for (i, w) in SPECIAL.iter().chain(WORDS.iter()).enumerate() {
        vocab.insert(w.to_string(), json!(i));
    }
    let added: Vec<Value> = SPECIAL
        .iter()
        .enumerate()
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    })
}

/// The test tokenizer with `<s>`, `</s>` and a ChatML template (staged through a file in `dir`: this
/// crate reaches `tokenizers` only through `peft_models`).
fn tiny_tokenizer(dir: &Path) -> Tokenizer {
    let path = dir.join("staging-tokenizer.json");
    std::fs::write(&path, tokenizer_json().to_string()).unwrap();
    let mut tok = Tokenizer::from_file(&path, None).unwrap();
    std::fs::remove_file(&path).unwrap();
    tok.set_bos_token(Some("<s>")).unwrap();
    tok.set_eos_token(Some("</s>")).unwrap();
    tok.set_chat_template(Some(CHATML.to_string()));
    tok
}

/// Writes `model/` (a 2-layer Llama, hidden 32, random weights, tied embeddings, the tokenizer) and
/// `train.txt` (the sentences repeated, ~600 words) into a new temporary directory.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let tok = tiny_tokenizer(&root);
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "_name_or_path": "tiny-test-llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": tok.vocab_size(),
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": true,
    });
    let llama = LlamaConfig::from_value(&config).unwrap();
    let tensors = LlamaForCausalLM::random_tensors(&llama, 0, DType::F32, &Device::Cpu).unwrap();
    let model = root.join("model");
    peft_models::export::write_hf_dir(&model, &config, &tensors, Some(&tok)).unwrap();
    let text = (0..20)
        .map(|i| SENTENCES[i % SENTENCES.len()])
        .collect::<Vec<_>>()
        .join(" ");
    let text = format!("{text}\n{text}\n");
    let data = root.join("train.txt");
    std::fs::write(&data, text).unwrap();
    Fixture {
        _tmp: tmp,
        root,
        model,
        data,
    }
}

fn s(p: &Path) -> String {
    p.to_str().expect("UTF-8 temp path").to_string()
}

/// Parses `peft <args…>` and runs it in-process; returns what it wrote.
fn peft(args: &[String]) -> anyhow::Result<String> {
    let cli = Cli::try_parse_from(std::iter::once("peft".to_string()).chain(args.iter().cloned()))?;
    let mut out = Vec::new();
    run_with(cli, &mut out)?;
    Ok(String::from_utf8(out)?)
}

/// `args!["train", path, …]`: every item through `ToArg`.
macro_rules! args {
    ($($a:expr),* $(,)?) => { Vec::<String>::from([$(ToArg::to_arg(&$a)),*]) };
}

trait ToArg {
    fn to_arg(&self) -> String;
}
impl<T: AsRef<std::ffi::OsStr> + ?Sized> ToArg for T {
    fn to_arg(&self) -> String {
        self.as_ref().to_str().expect("UTF-8 argument").to_string()
    }
}

/// `peft train` on the fixture for `steps` steps into `out`, with tiny batches and `extra` flags.
fn train(f: &Fixture, out: &Path, steps: u64, extra: &[String]) -> anyhow::Result<String> {
    train_on(&f.model, &f.data, out, steps, extra)
}

/// [`train`] with another model and data.
fn train_on(
    model: &Path,
    data: &Path,
    out: &Path,
    steps: u64,
    extra: &[String],
) -> anyhow::Result<String> {
    let mut a = args![
        "train",
        "--model",
        model,
        "--data",
        data,
        "--output",
        out,
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--lr",
        "1e-2",
        "--quiet",
    ];
    a.extend(args!["--steps", steps.to_string()]);
    a.extend(extra.iter().cloned());
    peft(&a)
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// Every tensor of a safetensors file as (name, dims, f32 bits).
fn tensor_bits(path: &Path) -> Vec<(String, Vec<usize>, Vec<u32>)> {
    peft::io::read_safetensors(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t): (String, Tensor)| {
            let dims = t.dims().to_vec();
            let v = t
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (n, dims, v.into_iter().map(f32::to_bits).collect())
        })
        .collect()
}

/// The train records of a metrics log as (step, loss, lr, grad_norm).
fn train_records(out: &Path) -> Vec<(u64, f64, f64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap(),
                v["lr"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn eval_nll(f: &Fixture, extra: &[String]) -> f64 {
    let mut a = args!["eval", "--model", f.model, "--data", f.data, "--json"];
    a.extend(extra.iter().cloned());
    let out = peft(&a).unwrap();
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    v["mean_nll"].as_f64().unwrap()
}

fn err_text(r: anyhow::Result<String>) -> String {
    error_report(&r.expect_err("expected an error"))
}

#[test]
fn train_lowers_the_loss_and_writes_a_peft_adapter_that_eval_reloads() {
    let f = fixture();
    let out = f.path("run");
    let report = train(&f, &out, 8, &[]).unwrap();
    assert!(report.contains("trained 8 steps"), "{report}");

    let summary = read_json(&out.join("summary.json"));
    let (before, after) = (
        summary["eval_loss_before"].as_f64().unwrap(),
        summary["eval_loss_after"].as_f64().unwrap(),
    );
    assert!(after < before, "eval loss {before} → {after}");
    assert_eq!(summary["steps"], 8);

    let adapter = out.join("adapter");
    let config = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 8);
    assert_eq!(config["base_model_name_or_path"], "tiny-test-llama");
    let tensors = tensor_bits(&adapter.join("adapter_model.safetensors"));
    let names: Vec<&str> = tensors.iter().map(|t| t.0.as_str()).collect();
    for l in 0..2 {
        for m in ["q_proj", "v_proj"] {
            for ab in ["lora_A", "lora_B"] {
                let key = format!("base_model.model.model.layers.{l}.self_attn.{m}.{ab}.weight");
                assert!(names.contains(&key.as_str()), "{key} not in {names:?}");
            }
        }
    }
    assert_eq!(names.len(), 2 * 2 * 2, "{names:?}");
    // lora_B starts at zero: trained, it is not zero any more.
    let b = tensors
        .iter()
        .find(|t| t.0.ends_with("layers.0.self_attn.q_proj.lora_B.weight"))
        .unwrap();
    assert_eq!(b.1, vec![32, 8]);
    assert!(b.2.iter().any(|&x| f32::from_bits(x) != 0.0));

    let records = train_records(&out);
    assert_eq!(
        records.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    assert!(records.iter().all(|r| r.1.is_finite() && r.2 > 0.0));
    let svg = std::fs::read_to_string(out.join("loss_curve.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
    assert!(out.join("checkpoints/last/trainer_state.json").is_file());

    // The saved adapter reloads and lowers the NLL on the data, as training did.
    let base = eval_nll(&f, &[]);
    let with = eval_nll(&f, &args!["--adapter", adapter]);
    assert!(
        with < base,
        "NLL without the adapter {base}, with it {with}"
    );

    // --save-logits writes the first batch and its logits.
    let logits = f.path("logits.safetensors");
    let a = args![
        "eval",
        "--model",
        f.model,
        "--data",
        f.data,
        "--seq-len",
        "16",
        "--batch-size",
        "3",
        "--max-examples",
        "5",
        "--save-logits",
        logits,
    ];
    let text = peft(&a).unwrap();
    assert!(text.contains("(5 examples)"), "{text}");
    let saved = peft::io::read_safetensors(&logits, &Device::Cpu).unwrap();
    assert_eq!(saved["input_ids"].dims(), &[3, 16]);
    assert_eq!(
        saved["logits"].dims(),
        &[3, 16, SPECIAL.len() + WORDS.len()]
    );
}

#[test]
fn resumed_training_is_bit_identical_to_a_straight_run() {
    let f = fixture();
    let extra = args!["--dropout", "0.1", "--targets", "q_proj,k_proj,down_proj"];
    let straight = f.path("straight");
    train(&f, &straight, 8, &extra).unwrap();
    let saving = f.path("saving");
    let mut e = extra.clone();
    e.extend(args!["--save-every", "4"]);
    train(&f, &saving, 8, &e).unwrap();
    let step4 = saving.join("checkpoints").join("step-4");
    assert!(step4.join("trainer_state.json").is_file());
    // The final checkpoint is `step-8`, and `last` a symlink to it (swapped in one rename).
    let last = std::fs::read_link(saving.join("checkpoints/last")).unwrap();
    assert_eq!(last, Path::new("step-8"));
    assert!(saving.join("checkpoints/last/trainer_state.json").is_file());

    let resumed = f.path("resumed");
    let mut e = extra.clone();
    e.extend(args!["--resume", step4]);
    let report = train(&f, &resumed, 8, &e).unwrap();
    assert!(report.contains("resumed at step 4"), "{report}");
    assert!(report.contains("trained 4 steps"), "{report}");
    assert_eq!(read_json(&resumed.join("summary.json"))["steps"], 4);

    let file = |d: &Path| d.join("adapter").join("adapter_model.safetensors");
    let reference = tensor_bits(&file(&straight));
    assert_eq!(reference.len(), 2 * 3 * 2);
    assert!(
        tensor_bits(&file(&saving)) == reference,
        "saving checkpoints changed the run"
    );
    assert!(
        tensor_bits(&file(&resumed)) == reference,
        "the resumed run differs from the straight one"
    );
    // The resumed log carries the checkpoint's records, then the new steps: the same numbers as the
    // straight run (times aside).
    let (a, b) = (train_records(&straight), train_records(&resumed));
    assert_eq!(a.len(), 8);
    assert_eq!(a, b);

    // Resuming in place (the run's own directory, whose log already holds steps 1..8) drops the log's lines
    // after the checkpoint and ends in the same state.
    let mut e = extra.clone();
    e.extend(args!["--resume", step4, "--save-every", "4"]);
    train(&f, &saving, 8, &e).unwrap();
    assert!(tensor_bits(&file(&saving)) == reference);
    assert_eq!(train_records(&saving), a);
}

/// `--gradient-checkpointing on` trains bit-identically to `off`: the same adapter bytes and the same logged
/// losses and gradient norms, with LoRA dropout, gradient accumulation over 3 micro-batches and an adapter on
/// the tied `lm_head`.
#[test]
fn gradient_checkpointing_trains_bit_identically() {
    let f = fixture();
    let extra = args![
        "--dropout",
        "0.1",
        "--targets",
        "q_proj,v_proj,down_proj,lm_head",
        "--grad-accum",
        "3"
    ];
    let run = |mode: &str| {
        let out = f.path(&format!("gc-{mode}"));
        let mut e = extra.clone();
        e.extend(args!["--gradient-checkpointing", mode]);
        train(&f, &out, 4, &e).unwrap();
        out
    };
    let (off, on) = (run("off"), run("on"));
    let file = |d: &Path| d.join("adapter").join("adapter_model.safetensors");
    let reference = tensor_bits(&file(&off));
    assert!(reference.len() > 2 * 3 * 2, "{}", reference.len());
    assert!(
        tensor_bits(&file(&on)) == reference,
        "checkpointing changed the trained adapter"
    );
    let (a, b) = (train_records(&off), train_records(&on));
    assert_eq!(a.len(), 4);
    assert_eq!(a, b);
}

#[test]
fn adapter_config_file_trains_dora_on_all_linear_layers() {
    let f = fixture();
    let cfg = f.path("dora.json");
    let spec = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
        "use_dora": true,
    });
    std::fs::write(&cfg, spec.to_string()).unwrap();
    let out = f.path("dora");
    // The file overrides the LoRA flags.
    train(
        &f,
        &out,
        4,
        &args!["--adapter-config", cfg, "--r", "16", "--targets", "q_proj"],
    )
    .unwrap();
    let summary = read_json(&out.join("summary.json"));
    assert!(
        summary["eval_loss_after"].as_f64().unwrap()
            < summary["eval_loss_before"].as_f64().unwrap(),
        "{summary}"
    );

    let adapter = out.join("adapter");
    let saved = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(saved["peft_type"], "LORA");
    assert_eq!(saved["use_dora"], true);
    assert_eq!(saved["r"], 4);
    assert_eq!(saved["lora_alpha"].as_f64(), Some(8.0));
    // PEFT 0.21.2 expands `all-linear` to the full names of the linear layers (the output layer
    // excepted), kept in full below its 20-name minimisation threshold.
    let mut targets: Vec<&str> = saved["target_modules"]
        .as_array()
        .unwrap_or_else(|| panic!("target_modules not expanded: {}", saved["target_modules"]))
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    targets.sort();
    let mut expected: Vec<String> = (0..2)
        .flat_map(|l| {
            [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
            ]
            .into_iter()
            .chain(["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"])
            .map(move |m| format!("model.layers.{l}.{m}"))
        })
        .collect();
    expected.sort();
    assert_eq!(targets, expected);
    let tensors = tensor_bits(&adapter.join("adapter_model.safetensors"));
    let magnitudes = tensors
        .iter()
        .filter(|t| t.0.ends_with(".lora_magnitude_vector"))
        .count();
    assert_eq!(magnitudes, 2 * 7);
    assert_eq!(tensors.len(), 2 * 7 * 3);
    assert!(
        tensors
            .iter()
            .any(|t| t.0 == "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector")
    );
    assert!(!tensors.iter().any(|t| t.0.contains("lm_head")));
    // It reloads for evaluation.
    let with = eval_nll(&f, &args!["--adapter", adapter]);
    assert!(with.is_finite());
}

/// `peft train --adapter-config` with a target-less IA3 config: PEFT's Llama defaults (k_proj, v_proj, and
/// down_proj feedforward), only the IA3 vectors train, the eval loss drops, and the adapter reloads.
#[test]
fn adapter_config_file_trains_ia3_with_llama_defaults() {
    let f = fixture();
    let cfg = f.path("ia3.json");
    let spec = json!({"peft_type": "IA3", "task_type": "CAUSAL_LM"});
    std::fs::write(&cfg, spec.to_string()).unwrap();
    let out = f.path("ia3");
    train(&f, &out, 6, &args!["--adapter-config", cfg]).unwrap();
    let summary = read_json(&out.join("summary.json"));
    assert!(
        summary["eval_loss_after"].as_f64().unwrap()
            < summary["eval_loss_before"].as_f64().unwrap(),
        "{summary}"
    );
    let adapter = out.join("adapter");
    let saved = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(saved["peft_type"], "IA3");
    let sorted = |v: &Value| {
        let mut s: Vec<String> = serde_json::from_value(v.clone()).unwrap();
        s.sort();
        s
    };
    assert_eq!(
        sorted(&saved["target_modules"]),
        ["down_proj", "k_proj", "v_proj"]
    );
    assert_eq!(sorted(&saved["feedforward_modules"]), ["down_proj"]);
    let tensors = tensor_bits(&adapter.join("adapter_model.safetensors"));
    assert_eq!(tensors.len(), 2 * 3);
    assert!(tensors.iter().all(|t| t.0.ends_with(".ia3_l")));
    let with = eval_nll(&f, &args!["--adapter", adapter]);
    assert!(with.is_finite());
}

/// `--init-adapter DIR` continues from a saved adapter: the second run starts where the first ended (its
/// eval loss before training is the first run's after), trains it further, and saves the same kind of
/// adapter; it does not combine with `--adapter-config`, and a FRoD config (which only PEFT can create) is
/// refused with a pointer to it.
#[test]
fn init_adapter_continues_a_saved_adapter() {
    let f = fixture();
    let cfg = f.path("ia3_init.json");
    std::fs::write(
        &cfg,
        json!({"peft_type": "IA3", "task_type": "CAUSAL_LM"}).to_string(),
    )
    .unwrap();
    let first = f.path("ia3_first");
    train(&f, &first, 4, &args!["--adapter-config", cfg]).unwrap();
    let second = f.path("ia3_second");
    train(
        &f,
        &second,
        4,
        &args!["--init-adapter", first.join("adapter")],
    )
    .unwrap();
    let (a, b) = (
        read_json(&first.join("summary.json")),
        read_json(&second.join("summary.json")),
    );
    let after_first = a["eval_loss_after"].as_f64().unwrap();
    let before_second = b["eval_loss_before"].as_f64().unwrap();
    assert!((after_first - before_second).abs() < 1e-6, "{a} / {b}");
    assert!(
        b["eval_loss_after"].as_f64().unwrap() < before_second,
        "{b}"
    );
    let saved = read_json(&second.join("adapter/adapter_config.json"));
    assert_eq!(saved["peft_type"], "IA3");
    assert_ne!(
        tensor_bits(&first.join("adapter/adapter_model.safetensors")),
        tensor_bits(&second.join("adapter/adapter_model.safetensors"))
    );
    let both = train(
        &f,
        &f.path("ia3_both"),
        1,
        &args![
            "--init-adapter",
            first.join("adapter"),
            "--adapter-config",
            cfg
        ],
    );
    assert!(both.is_err());
    let frod = f.path("frod.json");
    std::fs::write(
        &frod,
        json!({"peft_type": "FROD", "target_modules": ["q_proj"]}).to_string(),
    )
    .unwrap();
    let e = train(&f, &f.path("frod_out"), 1, &args!["--adapter-config", frod]).unwrap_err();
    assert!(format!("{e:#}").contains("--init-adapter"), "{e:#}");
}

/// `--optimizer lorafa` keeps every `lora_A` at its initialisation (bit for bit that of an `--lr 0` run) and
/// trains the `B`s; `--loraplus-lr-ratio 1` is plain AdamW bit for bit, and ratio 4 moves the `B`s (zero at
/// the start) of a one-step run 4 times as far as plain AdamW does; misuse is named.
#[test]
fn lorafa_and_loraplus_optimizers_train_as_peft_s() {
    let f = fixture();
    let file = |d: &Path| tensor_bits(&d.join("adapter").join("adapter_model.safetensors"));
    let frozen = f.path("lr0");
    peft(&args![
        "train",
        "--model",
        f.model,
        "--data",
        f.data,
        "--output",
        frozen,
        "--batch-size",
        "2",
        "--seq-len",
        "16",
        "--lr",
        "0",
        "--quiet",
        "--steps",
        "1"
    ])
    .unwrap();
    let fa = f.path("lorafa");
    train(&f, &fa, 4, &args!["--optimizer", "lorafa"]).unwrap();
    let (init, trained) = (file(&frozen), file(&fa));
    assert_eq!(init.len(), trained.len());
    for (i, t) in init.iter().zip(&trained) {
        assert_eq!(i.0, t.0);
        if t.0.contains("lora_A") {
            assert!(i.2 == t.2, "{} moved under LoRA-FA", t.0);
        } else {
            assert!(
                t.2.iter().any(|&b| f32::from_bits(b) != 0.0),
                "{} not trained",
                t.0
            );
        }
    }

    let plain = f.path("plain");
    train(&f, &plain, 1, &[]).unwrap();
    let ratio1 = f.path("ratio1");
    train(&f, &ratio1, 1, &args!["--loraplus-lr-ratio", "1"]).unwrap();
    assert!(
        file(&plain) == file(&ratio1),
        "LoRA+ with ratio 1 is not plain AdamW"
    );
    let ratio4 = f.path("ratio4");
    train(&f, &ratio4, 1, &args!["--loraplus-lr-ratio", "4"]).unwrap();
    let (p, q) = (file(&plain), file(&ratio4));
    for (i, (a, b)) in init.iter().zip(p.iter().zip(&q)) {
        if a.0.contains("lora_A") {
            // B starts at zero, so A's first gradient is zero: it has not moved yet.
            assert!(a.2 == i.2, "{}: A moved in the first step", a.0);
            assert!(a.2 == b.2, "{}: A moved differently under LoRA+", a.0);
        } else {
            for (x, y) in a.2.iter().zip(&b.2) {
                let (x, y) = (f32::from_bits(*x) as f64, f32::from_bits(*y) as f64);
                assert!(
                    (y - 4.0 * x).abs() <= 1e-6 * x.abs().max(1e-6),
                    "{}: {y} vs 4·{x}",
                    a.0
                );
            }
        }
    }

    let e = err_text(train(
        &f,
        &f.path("both"),
        1,
        &args!["--optimizer", "lorafa", "--loraplus-lr-ratio", "4"],
    ));
    assert!(e.contains("does not combine with lorafa"), "{e}");
    let cfg = f.path("ia3_fa.json");
    std::fs::write(
        &cfg,
        json!({"peft_type": "IA3", "task_type": "CAUSAL_LM"}).to_string(),
    )
    .unwrap();
    let e = err_text(train(
        &f,
        &f.path("ia3_fa"),
        1,
        &args!["--optimizer", "lorafa", "--adapter-config", cfg],
    ));
    assert!(e.contains("trains one LoRA adapter"), "{e}");
}

/// `peft train --adapter-config` with AdaLoRA: the rank allocator prunes to the budget, the saved config holds
/// the masks and the file the kept rows (PEFT's format), and the adapter reloads; without `total_step` a clear
/// error.
#[test]
fn adapter_config_file_trains_adalora_and_saves_the_masks() {
    let f = fixture();
    let cfg = f.path("adalora.json");
    let spec = json!({"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "target_modules": ["q_proj", "v_proj"],
        "init_r": 4, "target_r": 2, "lora_alpha": 8, "total_step": 6, "tinit": 1, "tfinal": 2});
    std::fs::write(&cfg, spec.to_string()).unwrap();
    let out = f.path("adalora");
    let text = train(&f, &out, 6, &args!["--adapter-config", cfg]).unwrap();
    assert!(text.contains("AdaLoRA:"), "{text}");
    let adapter = out.join("adapter");
    let saved = read_json(&adapter.join("adapter_config.json"));
    assert_eq!(saved["peft_type"], "ADALORA");
    let masks = saved["rank_pattern"]
        .as_object()
        .expect("rank_pattern saved");
    assert!(!masks.is_empty());
    let tensors = tensor_bits(&adapter.join("adapter_model.safetensors"));
    let mut kept_total = 0;
    for (k, m) in masks {
        let m: Vec<bool> = serde_json::from_value(m.clone()).unwrap();
        assert_eq!(m.len(), 4, "{k}");
        let kept = m.iter().filter(|b| **b).count();
        kept_total += kept;
        let module = k.strip_suffix(".lora_E").unwrap();
        let a = tensors
            .iter()
            .find(|t| t.0 == format!("base_model.model.{module}.lora_A"))
            .unwrap_or_else(|| panic!("{module}.lora_A saved"));
        assert_eq!(a.1[0], kept, "{module}: saved rows");
    }
    assert!(kept_total <= 2 * masks.len(), "budget {kept_total}");
    let with = eval_nll(&f, &args!["--adapter", adapter]);
    assert!(with.is_finite());
    let cfg2 = f.path("adalora_no_total.json");
    std::fs::write(
        &cfg2,
        json!({"peft_type": "ADALORA", "target_modules": ["q_proj"]}).to_string(),
    )
    .unwrap();
    let e = err_text(train(
        &f,
        &f.path("adalora2"),
        2,
        &args!["--adapter-config", cfg2],
    ));
    assert!(e.contains("total_step"), "{e}");
}

#[test]
fn generate_is_deterministic_bounded_and_seeded() {
    let f = fixture();
    let tok = tiny_tokenizer(&f.root);
    let gen_args = |extra: &[String]| {
        let mut a = args!["generate", "--model", f.model, "--prompt", "the cat sat"];
        if !extra.iter().any(|x| x == "--max-new-tokens") {
            a.extend(args!["--max-new-tokens", "5"]);
        }
        a.extend(extra.iter().cloned());
        a
    };
    let completion_ids = |text: &str| tok.encode(text.trim_end_matches('\n'), false).unwrap();

    let greedy = peft(&gen_args(&[])).unwrap();
    assert!(greedy.ends_with('\n'), "{greedy:?}");
    assert_eq!(peft(&gen_args(&[])).unwrap(), greedy);
    let n = completion_ids(&greedy).len();
    assert!(n <= 5, "{n} tokens: {greedy:?}");
    let one = peft(&gen_args(&args!["--max-new-tokens", "1"])).unwrap();
    assert!(completion_ids(&one).len() <= 1, "{one:?}");
    assert!(
        greedy.starts_with(one.trim_end()),
        "{one:?} is not the start of {greedy:?}"
    );

    // Sampling with a seed is reproducible; different seeds give different completions.
    let sampled =
        |seed: &str| peft(&gen_args(&args!["--temperature", "1.0", "--seed", seed])).unwrap();
    assert_eq!(sampled("7"), sampled("7"));
    let draws: Vec<String> = ["1", "2", "3", "4", "5"].into_iter().map(sampled).collect();
    assert!(draws.iter().any(|d| *d != draws[0]), "{draws:?}");
    for d in &draws {
        assert!(completion_ids(d).len() <= 5, "{d:?}");
    }

    // With a trained adapter, and with the chat template.
    let out = f.path("run");
    train(&f, &out, 2, &[]).unwrap();
    let adapter = out.join("adapter");
    let with = peft(&gen_args(&args!["--adapter", adapter])).unwrap();
    assert!(completion_ids(&with).len() <= 5, "{with:?}");
    assert_eq!(peft(&gen_args(&args!["--adapter", adapter])).unwrap(), with);
    let chat = peft(&gen_args(&args!["--chat"])).unwrap();
    assert!(completion_ids(&chat).len() <= 5, "{chat:?}");
}

#[test]
fn bad_paths_give_errors_naming_them() {
    let f = fixture();
    let missing = f.path("no-such-model");
    let e = err_text(peft(&args![
        "train",
        "--model",
        missing,
        "--data",
        f.data,
        "--output",
        f.path("o1"),
        "--quiet",
    ]));
    assert!(e.contains(&s(&missing)), "{e}");

    let missing_data = f.path("no-such-data.txt");
    let a = args![
        "train",
        "--model",
        f.model,
        "--data",
        missing_data,
        "--output",
        f.path("o2"),
        "--quiet",
    ];
    let e = err_text(peft(&a));
    assert!(e.contains(&s(&missing_data)), "{e}");

    let missing_cfg = f.path("no-such-config.json");
    let e = err_text(train(
        &f,
        &f.path("o3"),
        1,
        &args!["--adapter-config", missing_cfg],
    ));
    assert!(e.contains(&s(&missing_cfg)), "{e}");

    let e = err_text(peft(&args!["eval", "--model", missing, "--data", f.data]));
    assert!(e.contains(&s(&missing)), "{e}");
    let e = err_text(peft(&args![
        "eval",
        "--model",
        f.model,
        "--data",
        missing_data
    ]));
    assert!(e.contains(&s(&missing_data)), "{e}");
    let missing_adapter = f.path("no-such-adapter");
    let e = err_text(peft(&args![
        "eval",
        "--model",
        f.model,
        "--adapter",
        missing_adapter,
        "--data",
        f.data
    ]));
    assert!(e.contains(&s(&missing_adapter)), "{e}");
    let e = err_text(peft(&args![
        "generate", "--model", missing, "--prompt", "hi"
    ]));
    assert!(e.contains(&s(&missing)), "{e}");
}

#[test]
fn convert_refuses_what_is_not_a_gguf_file() {
    let f = fixture();
    let out = f.path("converted");
    // An HF directory, a safetensors file, a missing file: each error names the path, and nothing is
    // written.
    let weights = f.model.join("model.safetensors");
    let missing = f.path("absent.gguf");
    for (input, why) in [
        (&f.model, "is a directory"),
        (&weights, "invalid gguf file"),
        (&missing, "no such gguf file"),
    ] {
        let e = err_text(peft(&args!["convert", "--model", input, "--output", out]));
        assert!(e.contains(&s(input)), "{e}");
        assert!(e.to_lowercase().contains(why), "{e}");
        assert!(!out.exists());
    }
}

/// `peft train --adapter-config` with prompt tuning, prefix tuning (projection) and P-tuning (MLP, LSTM): only
/// the virtual tokens (and encoder) train, the loss drops, the adapter holds the single key `prompt_embeddings`
/// of PEFT's shape, and `eval` / `generate` load it; SAMPLE_VOCAB init is refused by name, and mixing a
/// prompt-learning adapter with another adapter too.
#[test]
fn adapter_config_file_trains_prompt_learning() {
    let f = fixture();
    let cases = [
        (
            "prompt",
            json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}),
        ),
        (
            "prefix",
            json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3,
                   "prefix_projection": true, "encoder_hidden_size": 8}),
        ),
        (
            "ptuning",
            json!({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2,
                   "encoder_hidden_size": 8}),
        ),
        (
            "ptuning_lstm",
            json!({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2,
                   "encoder_hidden_size": 4, "encoder_reparameterization_type": "LSTM"}),
        ),
    ];
    let base = eval_nll(&f, &[]);
    let mut lora = None;
    for (name, spec) in cases {
        let cfg = f.path(&format!("{name}.json"));
        std::fs::write(&cfg, spec.to_string()).unwrap();
        let out = f.path(name);
        let report = train(&f, &out, 6, &args!["--adapter-config", cfg]).unwrap();
        assert!(report.contains("trainable params"), "{report}");
        let summary = read_json(&out.join("summary.json"));
        assert!(
            summary["eval_loss_after"].as_f64().unwrap()
                < summary["eval_loss_before"].as_f64().unwrap(),
            "{name}: {summary}"
        );
        let adapter = out.join("adapter");
        let saved = read_json(&adapter.join("adapter_config.json"));
        assert_eq!(saved["peft_type"], spec["peft_type"]);
        let tensors = tensor_bits(&adapter.join("adapter_model.safetensors"));
        assert_eq!(tensors.len(), 1, "{name}");
        assert_eq!(tensors[0].0, "prompt_embeddings");
        let (layers, token_dim) = (
            saved["num_layers"].as_u64().unwrap() as usize,
            saved["token_dim"].as_u64().unwrap() as usize,
        );
        let n = spec["num_virtual_tokens"].as_u64().unwrap() as usize;
        let want = if name == "prefix" {
            vec![n, layers * 2 * token_dim]
        } else {
            vec![n, token_dim]
        };
        assert_eq!(tensors[0].1, want, "{name}");
        let with = eval_nll(&f, &args!["--adapter", adapter]);
        assert!(with.is_finite() && with != base, "{name}: {with} vs {base}");
        let generate = |a: &Path| {
            peft(&args![
                "generate",
                "--model",
                f.model,
                "--prompt",
                "the cat",
                "--max-new-tokens",
                "3",
                "--adapter",
                a
            ])
        };
        let text = generate(&adapter).unwrap();
        assert_eq!(generate(&adapter).unwrap(), text);
        if lora.is_none() {
            let out = f.path("lora");
            train(&f, &out, 1, &[]).unwrap();
            lora = Some(out.join("adapter"));
        }
        let lora = lora.as_ref().unwrap();
        let e = err_text(peft(&args![
            "eval",
            "--model",
            f.model,
            "--data",
            f.data,
            "--adapter",
            adapter,
            "--adapter",
            lora
        ]));
        assert!(e.contains("cannot be combined"), "{e}");
    }
    let cfg = f.path("sample.json");
    let spec = json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2,
                      "prompt_tuning_init": "SAMPLE_VOCAB"});
    std::fs::write(&cfg, spec.to_string()).unwrap();
    let e = err_text(train(
        &f,
        &f.path("sample"),
        1,
        &args!["--adapter-config", cfg],
    ));
    assert!(e.contains("SAMPLE_VOCAB"), "{e}");
}

/// `peft train --adapter-config` with LoHa (target-less: PEFT's Llama default q_proj / v_proj), LoKr (`decompose_both`, low-rank w2), OFT (exact Cayley, COFT) and BOFT
/// (two butterfly factors) on q_proj / v_proj: each lowers the eval loss, saves PEFT's parameter names for
/// exactly the targeted modules, reloads in `peft eval` with the trained effect, `peft inspect` lists its
/// sizes, and `peft merge` bakes it into weights that give the adapter's loss.
#[test]
fn adapter_config_file_trains_and_merges_loha_lokr_oft_boft() {
    let f = fixture();
    let specs = [
        (
            "loha",
            // no target_modules: PEFT's default for model_type "llama" (q_proj, v_proj)
            json!({"peft_type": "LOHA", "r": 4, "alpha": 8}),
            vec!["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
        ),
        (
            "lokr",
            json!({"peft_type": "LOKR", "r": 2, "alpha": 8, "decompose_both": true,
                   "target_modules": ["q_proj", "v_proj"]}),
            // hidden 32 = 4 × 8: w1 [4, 4] stays full (r < 4/2 fails), w2 [8, 8] is low-rank
            vec!["lokr_w1", "lokr_w2_a", "lokr_w2_b"],
        ),
        (
            "oft",
            json!({"peft_type": "OFT", "r": 0, "oft_block_size": 8, "use_cayley_neumann": false,
                   "coft": true, "eps": 0.5, "target_modules": ["q_proj", "v_proj"]}),
            vec!["oft_R.weight"],
        ),
        (
            "boft",
            json!({"peft_type": "BOFT", "boft_block_size": 4, "boft_n_butterfly_factor": 2,
                   "target_modules": ["q_proj", "v_proj"]}),
            vec!["boft_R", "boft_s"],
        ),
    ];
    let plain = eval_nll(&f, &[]);
    for (name, spec, params) in specs {
        let cfg = f.path(&format!("{name}.json"));
        std::fs::write(&cfg, spec.to_string()).unwrap();
        let out = f.path(name);
        train(&f, &out, 6, &args!["--adapter-config", cfg])
            .unwrap_or_else(|e| panic!("{name}: {}", error_report(&e)));
        let summary = read_json(&out.join("summary.json"));
        assert!(
            summary["eval_loss_after"].as_f64().unwrap()
                < summary["eval_loss_before"].as_f64().unwrap(),
            "{name}: {summary}"
        );
        let adapter = out.join("adapter");
        let saved = read_json(&adapter.join("adapter_config.json"));
        assert_eq!(saved["peft_type"], spec["peft_type"], "{name}");
        let tensors = tensor_bits(&adapter.join("adapter_model.safetensors"));
        let mut got: Vec<String> = tensors.iter().map(|t| t.0.clone()).collect();
        got.sort();
        let mut want = Vec::new();
        for l in 0..2 {
            for m in ["q_proj", "v_proj"] {
                for p in &params {
                    want.push(format!(
                        "base_model.model.model.layers.{l}.self_attn.{m}.{p}"
                    ));
                }
            }
        }
        want.sort();
        assert_eq!(got, want, "{name}");
        let with = eval_nll(&f, &args!["--adapter", adapter]);
        assert!(
            with.is_finite() && (with - plain).abs() > 1e-4,
            "{name}: {with} vs {plain}"
        );
        let inspected = peft(&args!["inspect", adapter]).unwrap();
        assert!(
            inspected.contains("self_attn.q_proj")
                && inspected.contains(spec["peft_type"].as_str().unwrap()),
            "{name}: {inspected}"
        );
        let merged = f.path(&format!("{name}-merged"));
        peft(&args![
            "merge",
            "--base",
            f.model,
            "--adapter",
            adapter,
            "--output",
            merged,
            "--quiet"
        ])
        .unwrap_or_else(|e| panic!("{name}: {}", error_report(&e)));
        let m = eval_nll_model(&f, &merged);
        assert!(
            (m - with).abs() < 1e-4,
            "{name}: merged {m} vs adapter {with}"
        );
    }
}

fn eval_nll_model(f: &Fixture, model: &Path) -> f64 {
    let out = peft(&args!["eval", "--model", model, "--data", f.data, "--json"]).unwrap();
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    v["mean_nll"].as_f64().unwrap()
}

/// A copy of the fixture's model directory without its tokenizer files, and the training text as
/// pre-tokenized JSONL (`input_ids` rows of 16 tokens).
fn tokenizer_less(f: &Fixture) -> (PathBuf, PathBuf) {
    let model = f.path("no-tokenizer-model");
    std::fs::create_dir_all(&model).unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(f.model.join(name), model.join(name)).unwrap();
    }
    assert!(!model.join("tokenizer.json").exists());
    let tok = tiny_tokenizer(&f.root);
    let text = std::fs::read_to_string(&f.data).unwrap();
    let ids = tok.encode(&text, false).unwrap();
    let rows: Vec<String> = ids
        .chunks(16)
        .filter(|c| c.len() >= 2)
        .map(|c| json!({ "input_ids": c }).to_string())
        .collect();
    let data = f.path("ids.jsonl");
    std::fs::write(&data, rows.join("\n") + "\n").unwrap();
    (model, data)
}

/// A model directory without `tokenizer.json` trains and evaluates on pre-tokenized `input_ids` data: the
/// eval loss drops in training, and `peft eval` with the saved adapter gives a lower NLL than without it.
#[test]
fn train_and_eval_without_a_tokenizer_on_input_ids_data() {
    let f = fixture();
    let (model, data) = tokenizer_less(&f);
    let out = f.path("no-tok-run");
    let report =
        train_on(&model, &data, &out, 8, &[]).unwrap_or_else(|e| panic!("{}", error_report(&e)));
    assert!(report.contains("trained 8 steps"), "{report}");
    let summary = read_json(&out.join("summary.json"));
    let (before, after) = (
        summary["eval_loss_before"].as_f64().unwrap(),
        summary["eval_loss_after"].as_f64().unwrap(),
    );
    assert!(after < before, "eval loss {before} → {after}");
    let nll = |extra: &[String]| {
        let mut a = args!["eval", "--model", model, "--data", data, "--json"];
        a.extend(extra.iter().cloned());
        let v: Value = serde_json::from_str(peft(&a).unwrap().trim()).unwrap();
        v["mean_nll"].as_f64().unwrap()
    };
    let (base, with) = (nll(&[]), nll(&args!["--adapter", out.join("adapter")]));
    assert!(
        with < base,
        "NLL without the adapter {base}, with it {with}"
    );
}

/// Without `tokenizer.json`, text data (train and eval), a sample prompt and `peft generate` fail with an
/// error that names the missing `tokenizer.json`.
#[test]
fn text_data_without_a_tokenizer_is_an_error_naming_tokenizer_json() {
    let f = fixture();
    let (model, ids) = tokenizer_less(&f);
    let train_err =
        |data: &Path, extra: &[String]| err_text(train_on(&model, data, &f.path("o"), 1, extra));
    let e = train_err(&f.data, &[]);
    assert!(
        e.contains("tokenizer.json") && e.contains(&s(&f.data)),
        "{e}"
    );
    let chat = f.path("chat.jsonl");
    std::fs::write(
        &chat,
        json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
            .to_string(),
    )
    .unwrap();
    let e = train_err(&chat, &[]);
    assert!(e.contains("tokenizer.json"), "{e}");
    let e = train_err(&ids, &args!["--sample-prompt", "the cat"]);
    assert!(e.contains("tokenizer.json"), "{e}");
    let e = err_text(peft(&args!["eval", "--model", model, "--data", f.data]));
    assert!(e.contains("tokenizer.json"), "{e}");
    let e = err_text(peft(&args![
        "generate", "--model", model, "--prompt", "the cat"
    ]));
    assert!(e.contains("tokenizer.json"), "{e}");
}

/// `fixtures/quant/cases/<case>`: tiny Llamas that transformers saved bitsandbytes-4-bit quantized, with a
/// PEFT LoRA adapter and the logits of both (gen_quant.py).
fn quant_case(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/quant/cases")
        .join(case)
}

#[test]
fn eval_on_a_bnb4_checkpoint_reproduces_peft_logits_and_nll() {
    let case = quant_case("bnb4_llama_nf4_dq");
    eval_reproduces_peft(
        "bnb4_llama_nf4_dq",
        &case.join("base"),
        &case.join("adapter"),
        &case.join("io.safetensors"),
        0.0,
    );
}

/// `peft eval --model <model> [--adapter <adapter>] --save-logits` on `io`'s `input_ids`: logits within
/// 1e-4 + `rtol`·|PEFT's| of its `base_logits` / `lora_logits` (PEFT's), and the reported mean NLL that of PEFT's
/// logits.
fn eval_reproduces_peft(name: &str, model: &Path, adapter: &Path, io: &Path, rtol: f64) {
    let io = candle_core::safetensors::load(io, &Device::Cpu).unwrap();
    let ids = io["input_ids"].to_vec2::<i64>().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("ids.jsonl");
    let rows: Vec<String> = ids
        .iter()
        .map(|r| json!({ "input_ids": r }).to_string())
        .collect();
    std::fs::write(&data, rows.join("\n")).unwrap();
    let seq_len = ids[0].len().to_string();
    for (with_adapter, want) in [(false, "base_logits"), (true, "lora_logits")] {
        let saved = tmp.path().join(format!("{want}.safetensors"));
        let mut a = args![
            "eval",
            "--model",
            model,
            "--data",
            data,
            "--seq-len",
            seq_len,
            "--batch-size",
            "2",
            "--json",
            "--save-logits",
            saved
        ];
        if with_adapter {
            a.extend(args!["--adapter", adapter]);
        }
        let out = peft(&a).unwrap();
        let got = candle_core::safetensors::load(&saved, &Device::Cpu).unwrap();
        peft_test_support::assert_close(
            &format!("{name} {want}"),
            &got["logits"],
            &io[want],
            1e-4,
            rtol,
        );
        // The mean next-token NLL of PEFT's logits.
        let logits = io[want].to_dtype(DType::F64).unwrap();
        let lse = logits.exp().unwrap().sum_keepdim(2).unwrap().log().unwrap();
        let logp = logits
            .broadcast_sub(&lse)
            .unwrap()
            .to_vec3::<f64>()
            .unwrap();
        let (mut sum, mut n) = (0.0, 0.0);
        for (b, row) in ids.iter().enumerate() {
            for t in 0..row.len() - 1 {
                sum -= logp[b][t][row[t + 1] as usize];
                n += 1.0;
            }
        }
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        let nll = v["mean_nll"].as_f64().unwrap();
        assert!(
            (nll - sum / n).abs() < 1e-4,
            "{name} {want}: NLL {nll} vs PEFT's {}",
            sum / n
        );
    }
}

#[test]
fn train_with_quantize_nf4_lowers_the_loss_and_eval_reloads_the_adapter() {
    let f = fixture();
    let out = f.path("qlora");
    let report = train(&f, &out, 8, &args!["--quantize", "nf4", "--double-quant"]).unwrap();
    assert!(
        report.contains(
            "base: 14 of 15 Linear layers quantized (bnb nf4 (blocksize 64, double quant))"
        ),
        "{report}"
    );
    let summary = read_json(&out.join("summary.json"));
    let (before, after) = (
        summary["eval_loss_before"].as_f64().unwrap(),
        summary["eval_loss_after"].as_f64().unwrap(),
    );
    assert!(after < before - 0.05, "{before} → {after}");
    let adapter = out.join("adapter").to_str().unwrap().to_string();
    let quantized = eval_nll(
        &f,
        &args!["--adapter", adapter, "--quantize", "nf4", "--double-quant"],
    );
    let dense = eval_nll(&f, &args!["--adapter", adapter]);
    let base = eval_nll(&f, &args!["--quantize", "nf4", "--double-quant"]);
    assert!(
        quantized < base,
        "the adapter helps the quantized base: {quantized} vs {base}"
    );
    assert!(
        (quantized - dense).abs() > 1e-6,
        "the quantized base is used"
    );
    let e = err_text(train(&f, &f.path("bad"), 1, &args!["--quantize", "int3"]));
    assert!(
        e.contains("unknown --quantize \"int3\" (nf4, fp4 or int8)"),
        "{e}"
    );
    let e = err_text(train(&f, &f.path("bad2"), 1, &args!["--double-quant"]));
    assert!(e.contains("--quantize"), "{e}");
}

#[test]
fn eval_on_gptq_and_awq_checkpoints_reproduces_peft_logits() {
    // gen_gptq.py: transformers' GPTQ (4-bit, desc_act, v1 and v2 zeros) and AWQ gemm tiny Llamas with PEFT LoRA
    // logits.
    for name in ["gptq_llama_v1", "gptq_llama", "awq_llama"] {
        let case = quant_case(name);
        eval_reproduces_peft(
            name,
            &case.join("base"),
            &case.join("adapter"),
            &case.join("io.safetensors"),
            0.0,
        );
    }
}

/// `peft eval` on a GGUF whose projections are in ten block types (Q4_0 … Q8_0, Q2_K … Q6_K; gen_gguf.py:
/// gguf-py's and ggml's quantizers), kept in their blocks: PEFT's logits on gguf-py's dequantized weights, with
/// and without the LoRA (1e-4 + 1e-4 relative: the LoRA logits are 1.3e-4 apart in absolute terms, both sides
/// within 1e-4 of a float64 forward).
#[test]
fn eval_on_a_gguf_with_block_types_reproduces_peft_on_the_dequantized_weights() {
    let case = quant_case("gguf_blocks");
    eval_reproduces_peft(
        "gguf_blocks",
        &case.join("model.gguf"),
        &case.join("adapter"),
        &case.join("io.safetensors"),
        1e-4,
    );
}

fn gguf_lora_case(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf_lora/cases")
        .join(case)
}

/// `peft export --format gguf`: the file llama.cpp's convert_lora_to_gguf.py wrote for the same adapter, byte for
/// byte, at each --outtype; a summary line; refusals (DoRA, a non-LoRA adapter, an unknown outtype, a missing
/// base) name the thing and leave no file.
#[test]
fn export_gguf_writes_the_converters_file() {
    let tmp = tempfile::tempdir().unwrap();
    let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/models/cases/llama_gqa");
    let adapter = gguf_lora_case("mlp_embed_r32").join("adapter");
    for t in ["f32", "f16", "q8_0"] {
        let out = tmp.path().join(format!("a_{t}.gguf"));
        let report = peft(&args![
            "export",
            "--adapter",
            adapter,
            "--format",
            "gguf",
            "--base",
            base,
            "--outtype",
            t,
            "--output",
            out
        ])
        .unwrap();
        let types = if t == "f32" {
            "F32"
        } else if t == "f16" {
            "F16"
        } else {
            "Q8_0"
        };
        assert_eq!(
            report.trim(),
            format!(
                "wrote {} (16 tensors, {types}, alpha 16, architecture llama)",
                s(&out)
            )
        );
        let want =
            std::fs::read(gguf_lora_case("mlp_embed_r32").join(format!("converter_{t}.gguf")));
        assert!(std::fs::read(&out).unwrap() == want.unwrap(), "{t}");
    }
    // The default outtype is f32.
    let out = tmp.path().join("default.gguf");
    peft(&args![
        "export", "-a", adapter, "--format", "gguf", "-b", base, "-o", out
    ])
    .unwrap();
    let want = std::fs::read(gguf_lora_case("mlp_embed_r32").join("converter_f32.gguf")).unwrap();
    assert!(std::fs::read(&out).unwrap() == want);

    // DoRA: refused by name, nothing written.
    let dora = tmp.path().join("dora");
    std::fs::create_dir(&dora).unwrap();
    let mut cfg = read_json(&adapter.join("adapter_config.json"));
    cfg["use_dora"] = json!(true);
    std::fs::write(dora.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        adapter.join("adapter_model.safetensors"),
        dora.join("adapter_model.safetensors"),
    )
    .unwrap();
    let out = tmp.path().join("dora.gguf");
    let e = err_text(peft(&args![
        "export",
        "--adapter",
        dora,
        "--format",
        "gguf",
        "--base",
        base,
        "--output",
        out
    ]));
    assert!(e.contains("use_dora") && e.contains(&s(&dora)), "{e}");
    assert!(!out.exists());
    // A non-LoRA adapter.
    let ia3 =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/ia3/cases/ia3_linear/adapter");
    let e = err_text(peft(&args![
        "export",
        "--adapter",
        ia3,
        "--format",
        "gguf",
        "--base",
        base,
        "--output",
        out
    ]));
    assert!(e.contains("peft_type IA3"), "{e}");
    assert!(!out.exists());
    // Bad arguments.
    let e = err_text(peft(&args![
        "export",
        "--adapter",
        adapter,
        "--format",
        "gguf",
        "--base",
        base,
        "--output",
        out,
        "--outtype",
        "q4_0"
    ]));
    assert!(e.contains("q4_0") && e.contains("--outtype"), "{e}");
    let missing = tmp.path().join("absent");
    let e = err_text(peft(&args![
        "export",
        "--adapter",
        adapter,
        "--format",
        "gguf",
        "--base",
        missing,
        "--output",
        out
    ]));
    assert!(
        e.contains("does not exist") && e.contains(&s(&missing)),
        "{e}"
    );
    let e = err_text(peft(&args![
        "export",
        "--adapter",
        adapter,
        "--base",
        base,
        "--output",
        out
    ]));
    assert!(e.contains("--format"), "{e}");
    assert!(!out.exists());
}

/// Runs `peft merge <args…>` in-process, returning the library's report (for `--requantize`'s numbers).
fn merge_report(args: &[String]) -> anyhow::Result<peft::merge::MergeReport> {
    let cli = Cli::try_parse_from(
        ["peft".to_string(), "merge".to_string()]
            .into_iter()
            .chain(args.iter().cloned()),
    )?;
    let crate::Command::Merge(m) = cli.command else {
        panic!("not parsed as merge");
    };
    crate::merge::run(&m, &mut Vec::new())
}

/// The logits of the model directory `dir` (no adapter) on `ids`.
fn model_logits(model: &LlamaForCausalLM, ids: &Tensor) -> Tensor {
    model
        .forward(
            peft_models::llama::ForwardInput::ids(ids),
            &peft::ForwardCtx::eval(),
        )
        .unwrap()
}

const LLAMA_PROJ: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// `peft merge` into GPTQ (v1 and v2 zero points, desc_act) and AWQ checkpoints: the packed weights are
/// dequantized (float16, as gptqmodel), merged in f32 and written dense; the merged directory loads as a plain
/// model whose logits are PEFT's LoRA logits over the quantized checkpoint.
#[test]
fn merge_into_gptq_and_awq_bases_writes_dense_weights_with_the_lora_logits() {
    for name in ["gptq_llama_v1", "gptq_llama", "awq_llama"] {
        let case = quant_case(name);
        let io = candle_core::safetensors::load(case.join("io.safetensors"), &Device::Cpu).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let summary = peft(&args![
            "merge",
            "--base",
            case.join("base"),
            "--adapter",
            case.join("adapter"),
            "--output",
            out,
            "-q"
        ])
        .unwrap();
        assert!(
            summary.starts_with("merged 14 modules from 1 adapter"),
            "{name}: {summary}"
        );
        let config = read_json(&out.join("config.json"));
        assert!(config.get("quantization_config").is_none(), "{name}");
        let merged =
            candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
        for k in merged.keys() {
            assert!(
                ["qweight", "qzeros", "scales", "g_idx"]
                    .iter()
                    .all(|s| !k.ends_with(&format!(".{s}"))),
                "{name}: {k} left"
            );
        }
        for l in 0..2 {
            for p in LLAMA_PROJ {
                let w = &merged[&format!("model.layers.{l}.{p}.weight")];
                assert_eq!(w.dtype(), DType::F32, "{name} {p}");
            }
        }
        let w = &merged["model.layers.0.mlp.down_proj.weight"];
        assert_eq!(w.dims(), [64, 128], "{name}");
        let loaded = peft_models::load_model(&out, &Device::Cpu).unwrap();
        assert!(peft_models::quantize::summary(&loaded.model).is_none());
        let got = model_logits(&loaded.model, &io["input_ids"]);
        let d = peft_test_support::max_diff(&got, &io["lora_logits"]);
        let moved = peft_test_support::max_diff(&io["base_logits"], &io["lora_logits"]);
        eprintln!("{name}: merged vs PEFT LoRA logits {d:.2e} (LoRA moves them by {moved:.3})");
        assert!(d < 1e-4, "{name}: {d}");
        // --dtype bf16 rounds every float tensor, the dense weights included.
        let out16 = tmp.path().join("merged16");
        peft(&args![
            "merge",
            "-b",
            case.join("base"),
            "-a",
            case.join("adapter"),
            "-o",
            out16,
            "--dtype",
            "bf16"
        ])
        .unwrap();
        let m16 =
            candle_core::safetensors::load(out16.join("model.safetensors"), &Device::Cpu).unwrap();
        assert!(m16.values().all(|t| t.dtype() == DType::BF16), "{name}");
    }
}

/// `peft merge --requantize` into bitsandbytes 4-bit (NF4, NF4 + double quant, FP4) and 8-bit checkpoints:
/// the output is a checkpoint of the same kind (the same tensors, dtypes and `quantization_config`), its
/// weights are bit for bit what `merge_and_unload` re-quantizes, and its logits are PEFT's re-quantizing
/// merge's (`merged_logits`, gen_quant.py).
#[test]
fn merge_requantize_into_bnb_bases_writes_the_checkpoint_peft_merges_to() {
    for name in [
        "bnb4_llama_nf4",
        "bnb4_llama_nf4_dq",
        "bnb4_llama_fp4",
        "bnb8_llama",
    ] {
        let case = quant_case(name);
        let io = candle_core::safetensors::load(case.join("io.safetensors"), &Device::Cpu).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let report = merge_report(&args![
            "--base",
            case.join("base"),
            "--adapter",
            case.join("adapter"),
            "--output",
            out,
            "--requantize",
            "-q"
        ])
        .unwrap();
        assert_eq!(report.requantized.len(), 14, "{name}");
        let worst = report
            .requantized
            .iter()
            .map(|r| r.max_error)
            .fold(0f32, f32::max);
        assert!(worst > 0.0, "{name}");
        let warning = crate::merge::requantize_warning(&report).unwrap();
        assert!(
            warning.contains("lossy") && warning.contains("3.1-4.9 at 4 bits"),
            "{warning}"
        );
        assert!(
            warning.contains("max |dequant(requant(W')) - W'| = "),
            "{warning}"
        );
        eprintln!("{name}: {warning}");
        // The same kind of checkpoint: config kept, the same tensors in the same dtypes.
        assert_eq!(
            read_json(&out.join("config.json"))["quantization_config"],
            read_json(&case.join("base/config.json"))["quantization_config"]
        );
        let info = |p: &Path| {
            let f = peft::io::SafetensorsFile::open(p).unwrap();
            let mut v: Vec<_> = f
                .names()
                .into_iter()
                .map(|n| {
                    let (shape, dt) = f.info(&n).unwrap();
                    let shape = if n.contains(".quant_state.") {
                        vec![]
                    } else {
                        shape
                    };
                    (n, shape, dt)
                })
                .collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            v
        };
        assert_eq!(
            info(&out.join("model.safetensors")),
            info(&case.join("base/model.safetensors")),
            "{name}"
        );
        let ours = peft_models::load_model(&out, &Device::Cpu).unwrap().model;
        assert!(peft_models::quantize::summary(&ours).is_some(), "{name}");
        let base = peft_models::load_model(case.join("base"), &Device::Cpu)
            .unwrap()
            .model;
        let pm =
            peft::PeftModel::from_pretrained(base, case.join("adapter"), "default", &Device::Cpu)
                .unwrap();
        let theirs = pm.merge_and_unload(None).unwrap();
        for l in 0..2 {
            for p in LLAMA_PROJ {
                let m = format!("model.layers.{l}.{p}");
                let q = |model: &LlamaForCausalLM| {
                    model
                        .slot(&m)
                        .unwrap()
                        .base()
                        .quantized()
                        .unwrap_or_else(|| panic!("{name}: {m} is not quantized"))
                        .clone()
                };
                assert!(q(&ours) == q(&theirs), "{name}: {m}");
            }
        }
        let got = model_logits(&ours, &io["input_ids"]);
        let d = peft_test_support::max_diff(&got, &io["merged_logits"]);
        let loss = peft_test_support::max_diff(&got, &io["lora_logits"]);
        eprintln!("{name}: vs PEFT's merged logits {d:.2e}; vs the unmerged LoRA {loss:.3}");
        assert!(d < 1e-4, "{name}: {d}");
    }
}

/// `--requantize` where there is nothing to re-quantize into, or no re-quantizer: errors naming the reason,
/// nothing written.
#[test]
fn merge_requantize_refuses_gptq_awq_gguf_and_dense_bases() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let run = |base: PathBuf, adapter: PathBuf| {
        err_text(peft(&args![
            "merge",
            "-b",
            base,
            "-a",
            adapter,
            "-o",
            out,
            "--requantize"
        ]))
    };
    for name in ["gptq_llama_v1", "awq_llama"] {
        let c = quant_case(name);
        let e = run(c.join("base"), c.join("adapter"));
        assert!(
            e.contains("`requantize`") && e.contains("no GPTQ or AWQ re-quantizer"),
            "{name}: {e}"
        );
    }
    let lora = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lora/cases/llama_qv");
    let e = run(lora.join("base_hf"), lora.join("adapter"));
    assert!(
        e.contains("no bitsandbytes 4-bit or 8-bit weights to re-quantize"),
        "{e}"
    );
    let gguf = tmp.path().join("model.gguf");
    std::fs::write(&gguf, b"GGUF").unwrap();
    let e = run(gguf, quant_case("bnb8_llama").join("adapter"));
    assert!(e.contains("--requantize") && e.contains("GGUF"), "{e}");
    // An unknown GPTQ checkpoint format is an error naming the field.
    let odd = tmp.path().join("odd");
    std::fs::create_dir(&odd).unwrap();
    let c = quant_case("gptq_llama_v1");
    std::fs::copy(
        c.join("base/model.safetensors"),
        odd.join("model.safetensors"),
    )
    .unwrap();
    let mut config = read_json(&c.join("base/config.json"));
    config["quantization_config"]["checkpoint_format"] = json!("marlin");
    std::fs::write(odd.join("config.json"), config.to_string()).unwrap();
    let e = err_text(peft(&args![
        "merge",
        "-b",
        odd,
        "-a",
        c.join("adapter"),
        "-o",
        out
    ]));
    assert!(
        e.contains("quantization_config.checkpoint_format") && e.contains("marlin"),
        "{e}"
    );
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut left = left;
    left.sort();
    assert_eq!(left, ["model.gguf", "odd"]);
}

/// `peft merge --base x.gguf --output y.gguf`: the adapter merged into a GGUF of the same tensor types (the tiny
/// SentencePiece-vocab GGUF fixture, f32 weights: the merge is exact), giving the logits of the base with the
/// adapter; `--dtype` with a GGUF output is refused.
#[test]
fn merge_into_a_gguf_base_writes_a_gguf_with_the_adapters_logits() {
    use peft::config::{LoraConfig, LoraFields, TargetFields};
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let base = fixtures.join("spm_tokenizer/tiny_spm.gguf");
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let loaded = peft_models::load_model(&base, &dev).unwrap();
    let config = peft::PeftConfig::Lora(LoraConfig {
        lora: LoraFields {
            r: 4,
            lora_alpha: 8.0,
            init_lora_weights: peft::config::InitLoraWeights::Bool(false),
            ..Default::default()
        },
        targets: TargetFields::modules(["q_proj", "k_proj", "down_proj"]),
        ..Default::default()
    });
    let pm = peft::PeftModel::get_peft_model(loaded.model, config, "default", 3).unwrap();
    let adapter = tmp.path().join("adapter");
    pm.save_pretrained(&adapter).unwrap();
    let ids = Tensor::new(&[[1u32, 20, 33, 57, 101, 7]], &dev).unwrap();
    let want = model_logits(pm.model(), &ids);
    let plain = model_logits(&peft_models::load_model(&base, &dev).unwrap().model, &ids);
    let out = tmp.path().join("merged.gguf");
    let report = merge_report(&[
        "--base".into(),
        base.display().to_string(),
        "--adapter".into(),
        adapter.display().to_string(),
        "--output".into(),
        out.display().to_string(),
    ])
    .unwrap();
    assert_eq!(
        report.modules.len(),
        3 * pm.model().config().num_hidden_layers
    );
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        std::fs::metadata(&base).unwrap().len()
    );
    let merged = model_logits(&peft_models::load_model(&out, &dev).unwrap().model, &ids);
    let d = peft_test_support::max_diff(&merged, &want);
    let effect = peft_test_support::max_diff(&plain, &want);
    assert!(
        d < 1e-4 && effect > 1e-2,
        "merged vs adapter {d}, adapter effect {effect}"
    );
    let e = merge_report(&[
        "--base".into(),
        base.display().to_string(),
        "--adapter".into(),
        adapter.display().to_string(),
        "--output".into(),
        tmp.path().join("m2.gguf").display().to_string(),
        "--dtype".into(),
        "f16".into(),
    ])
    .unwrap_err();
    assert!(format!("{e:#}").contains("--dtype"), "{e:#}");
}

/// `--dtype bf16|f16` on `peft eval`, `train` and `generate`: the frozen base held in half precision, computed
/// in f32. The NLL stays within the acceptance bound (1e-2) of the f32 model's, LoRA training lowers the loss
/// and saves f32 adapter tensors, and `--quantize` with a half dtype is an error naming both flags.
#[test]
fn dtype_bf16_and_f16_bases_evaluate_close_to_f32_and_train() {
    let f = fixture();
    let nll32 = eval_nll(&f, &[]);
    assert_eq!(eval_nll(&f, &args!["--dtype", "f32"]), nll32);
    for d in ["bf16", "f16"] {
        let nll = eval_nll(&f, &args!["--dtype", d]);
        assert!(
            (nll - nll32).abs() <= 1e-2 && nll != nll32,
            "--dtype {d}: NLL {nll} vs f32 {nll32}"
        );
    }
    let out = f.path("bf16");
    let report = train(&f, &out, 8, &args!["--dtype", "bf16"]).unwrap();
    assert!(
        report.contains("base weights: BF16, computed in F32"),
        "{report}"
    );
    let summary = read_json(&out.join("summary.json"));
    let (before, after) = (
        summary["eval_loss_before"].as_f64().unwrap(),
        summary["eval_loss_after"].as_f64().unwrap(),
    );
    assert!(after < before - 0.05, "{before} → {after}");
    let saved =
        peft::io::read_safetensors(out.join("adapter/adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(!saved.is_empty());
    for (k, t) in &saved {
        assert_eq!(t.dtype(), DType::F32, "{k}");
    }
    // The adapter trained on the bf16 base, evaluated on both bases.
    let adapter = s(&out.join("adapter"));
    let on_half = eval_nll(&f, &args!["--adapter", adapter, "--dtype", "bf16"]);
    let on_full = eval_nll(&f, &args!["--adapter", adapter]);
    assert!((on_half - on_full).abs() <= 1e-2, "{on_half} vs {on_full}");
    let g = peft(&args![
        "generate",
        "--model",
        f.model,
        "--prompt",
        "the cat sat",
        "--max-new-tokens",
        "3",
        "--dtype",
        "f16"
    ])
    .unwrap();
    assert!(g.ends_with('\n'), "{g:?}");
    let e = err_text(train(
        &f,
        &f.path("bad"),
        1,
        &args!["--dtype", "bf16", "--quantize", "nf4"],
    ));
    assert!(
        e.contains("--dtype bf16 cannot be combined with --quantize nf4"),
        "{e}"
    );
    let e = err_text(peft(&args![
        "eval",
        "--model",
        quant_case("bnb4_llama_nf4").join("base"),
        "--data",
        f.data,
        "--dtype",
        "f16"
    ]));
    assert!(
        e.contains("saved quantized") && e.contains("--dtype f16"),
        "{e}"
    );
}

/// `peft merge` refuses outputs that alias the base, comparing resolved paths: the base file itself (also as
/// `./dir/../dir/model.safetensors`), the directory holding the base file (a directory output writes
/// `model.safetensors` there: it used to overwrite the base and exit 0), and a path inside the base model's
/// directory. The base stays byte for byte what it was; an output beside it works.
#[test]
fn merge_refuses_outputs_that_alias_the_base() {
    let lora = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lora/cases/llama_qv");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("base");
    std::fs::create_dir(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(lora.join("base_hf").join(f), dir.join(f)).unwrap();
    }
    let file = dir.join("model.safetensors");
    let before = std::fs::read(&file).unwrap();
    let adapter = lora.join("adapter");
    let merge = |base: &Path, out: &Path| {
        err_text(peft(&args!["merge", "-b", base, "-a", adapter, "-o", out]))
    };
    let e = merge(&file, &dir);
    assert!(e.contains("would overwrite the base model"), "{e}");
    let e = merge(&file, &dir.join("../base/model.safetensors"));
    assert!(e.contains("would overwrite the base model"), "{e}");
    let e = merge(&dir, &dir);
    assert!(e.contains("would overwrite the base model"), "{e}");
    let e = merge(&dir, &dir.join("merged"));
    assert!(e.contains("inside the base model's directory"), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), before);
    assert!(!dir.join("merged").exists());
    let out = tmp.path().join("merged.safetensors");
    peft(&args!["merge", "-b", file, "-a", adapter, "-o", out]).unwrap();
    assert!(out.is_file());
    assert_eq!(std::fs::read(&file).unwrap(), before);
}

/// Flag values out of range are refused by the parser with the flag's name (`--grad-accum 0` used to panic
/// dividing by zero; NaN epochs, a negative temperature, `top_p` NaN or above 1 were accepted).
#[test]
fn out_of_range_flag_values_are_refused_with_the_flag_name() {
    let parse = |args: &[&str]| {
        Cli::try_parse_from(std::iter::once("peft").chain(args.iter().copied()))
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let train = ["train", "--model", "m", "--data", "d", "--output", "o"];
    for (flag, value, says) in [
        ("--grad-accum", "0", "at least 1"),
        ("--batch-size", "0", "at least 1"),
        ("--seq-len", "0", "at least 1"),
        ("--epochs", "NaN", "finite"),
        ("--epochs", "0", "> 0"),
        ("--lr", "-1", "≥ 0"),
        ("--lr", "inf", "finite"),
        ("--max-grad-norm", "NaN", "finite"),
        ("--momentum", "1", "< 1"),
    ] {
        let kv = format!("{flag}={value}");
        let mut a = train.to_vec();
        a.push(&kv);
        let e = parse(&a);
        assert!(e.contains(flag) && e.contains(says), "{flag} {value}: {e}");
    }
    let generate = ["generate", "--model", "m", "--prompt", "p"];
    for (flag, value, says) in [
        ("--temperature", "-1", "≥ 0"),
        ("--top-p", "NaN", "finite"),
        ("--top-p", "1.5", "≤ 1"),
        ("--top-p", "0", "> 0"),
    ] {
        let kv = format!("{flag}={value}");
        let mut a = generate.to_vec();
        a.push(&kv);
        let e = parse(&a);
        assert!(e.contains(flag) && e.contains(says), "{flag} {value}: {e}");
    }
}
