//! `peft_models::gguf_merge`: a LoRA merged into a tiny llama GGUF keeps every ggml type, every untouched
//! byte and the metadata; merged tensors equal `requant(dequant(W) + ΔW)` computed here; an F32 tensor merges
//! exactly; the merged file's logits match the in-memory merge; the refusals are errors.

use candle_core::quantized::gguf_file::{self, Value as GgufValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use peft::PeftConfig;
use peft::merge::MergeAdapter;
use peft_models::gguf::{permute_qk, unpermute_qk};
use peft_models::gguf_merge::{GgufMergeReport, merge_into_gguf};
use peft_models::llama::ForwardInput;
use peft_models::{LoadOptions, load_model_with, with_adapters};
use std::path::{Path, PathBuf};

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const VOCAB: usize = 20;
const R: usize = 4;
const ALPHA: f64 = 8.0;

/// The dimensions of a tiny llama.
#[derive(Clone, Copy)]
struct Dims {
    hidden: usize,
    ffn: usize,
    layers: usize,
}

const SMALL: Dims = Dims {
    hidden: 64,
    ffn: 96,
    layers: 2,
};
/// k-quants need rows of 256.
const KQUANT: Dims = Dims {
    hidden: 256,
    ffn: 256,
    layers: 1,
};

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5) * scale
        })
        .collect()
}

fn tensor(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    Tensor::from_vec(
        values(shape.iter().product(), seed, scale),
        shape,
        &Device::Cpu,
    )
    .unwrap()
}

/// `(GGUF name, HF module, row-major shape)` of the tiny llama's tensors (tied embeddings).
fn layout(d: Dims) -> Vec<(String, String, Vec<usize>)> {
    let hd = d.hidden / HEADS;
    let mut v = vec![(
        "token_embd.weight".to_string(),
        "model.embed_tokens".to_string(),
        vec![VOCAB, d.hidden],
    )];
    for l in 0..d.layers {
        for (g, h, s) in [
            ("attn_norm", "input_layernorm", vec![d.hidden]),
            ("attn_q", "self_attn.q_proj", vec![HEADS * hd, d.hidden]),
            ("attn_k", "self_attn.k_proj", vec![KV_HEADS * hd, d.hidden]),
            ("attn_v", "self_attn.v_proj", vec![KV_HEADS * hd, d.hidden]),
            (
                "attn_output",
                "self_attn.o_proj",
                vec![d.hidden, HEADS * hd],
            ),
            ("ffn_norm", "post_attention_layernorm", vec![d.hidden]),
            ("ffn_gate", "mlp.gate_proj", vec![d.ffn, d.hidden]),
            ("ffn_up", "mlp.up_proj", vec![d.ffn, d.hidden]),
            ("ffn_down", "mlp.down_proj", vec![d.hidden, d.ffn]),
        ] {
            v.push((
                format!("blk.{l}.{g}.weight"),
                format!("model.layers.{l}.{h}"),
                s,
            ));
        }
    }
    v.push((
        "output_norm.weight".into(),
        "model.norm".into(),
        vec![d.hidden],
    ));
    v
}

fn metadata(d: Dims, arch: &str) -> Vec<(String, GgufValue)> {
    let u = |x: usize| GgufValue::U32(x as u32);
    let s = |x: &str| GgufValue::String(x.into());
    let tokens = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "a",
        "b",
        "c",
        "Ġ",
        "ab",
        "abc",
        "Ġa",
        "Ġab",
        "1",
        "2",
        "12",
        "Ċ",
        "Ã",
        "©",
        "d",
        "Ġb",
        "<tool>",
    ];
    let mut types = vec![GgufValue::I32(1); VOCAB];
    for t in &mut types[..3] {
        *t = GgufValue::I32(3);
    }
    let merges = ["Ġ a", "Ġa b", "a b", "ab c", "1 2", "Ġ b"];
    vec![
        ("general.architecture".into(), s(arch)),
        ("general.name".into(), s("tiny merge test")),
        ("general.alignment".into(), u(32)),
        ("llama.block_count".into(), u(d.layers)),
        ("llama.context_length".into(), u(256)),
        ("llama.embedding_length".into(), u(d.hidden)),
        ("llama.feed_forward_length".into(), u(d.ffn)),
        ("llama.attention.head_count".into(), u(HEADS)),
        ("llama.attention.head_count_kv".into(), u(KV_HEADS)),
        ("llama.rope.freq_base".into(), GgufValue::F32(10000.0)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            GgufValue::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        (
            "tokenizer.ggml.tokens".into(),
            GgufValue::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), GgufValue::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            GgufValue::Array(merges.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), u(1)),
        ("tokenizer.ggml.eos_token_id".into(), u(2)),
    ]
}

/// Writes a tiny llama GGUF with `dtype_of(gguf name)` per tensor (q / k rows permuted as llama.cpp stores
/// them); returns the HF weights it was made from.
fn write_base(
    path: &Path,
    d: Dims,
    arch: &str,
    dtype_of: &dyn Fn(&str) -> GgmlDType,
) -> Vec<(String, Tensor)> {
    let mut hf = Vec::new();
    let mut qs = Vec::new();
    for (i, (g, h, s)) in layout(d).into_iter().enumerate() {
        let t = if s.len() == 1 {
            (tensor(&s, i as u64 + 1, 0.2) + 1.0).unwrap()
        } else {
            tensor(&s, i as u64 + 1, 0.5)
        };
        let stored = if g.contains("attn_q") {
            permute_qk(&t, HEADS).unwrap()
        } else if g.contains("attn_k") {
            permute_qk(&t, KV_HEADS).unwrap()
        } else {
            t.clone()
        };
        qs.push((g.clone(), QTensor::quantize(&stored, dtype_of(&g)).unwrap()));
        hf.push((format!("{h}.weight"), t));
    }
    let md = metadata(d, arch);
    let md: Vec<(&str, &GgufValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = qs.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &ts).unwrap();
    hf
}

/// Saves a LoRA (r 4, alpha 8) on `targets` (HF module suffixes) of every layer, with non-zero A and B.
fn write_lora(dir: &Path, d: Dims, targets: &[&str]) -> PathBuf {
    let mut tensors = Vec::new();
    for (i, (_, h, s)) in layout(d).into_iter().enumerate() {
        if s.len() != 2 || !targets.iter().any(|t| h.ends_with(t)) {
            continue;
        }
        let key = format!("base_model.model.{h}");
        tensors.push((
            format!("{key}.lora_A.weight"),
            tensor(&[R, s[1]], 100 + i as u64, 0.5),
        ));
        tensors.push((
            format!("{key}.lora_B.weight"),
            tensor(&[s[0], R], 200 + i as u64, 0.2),
        ));
    }
    let config = PeftConfig::from_json_str(&format!(
        r#"{{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": {R}, "lora_alpha": {ALPHA}, "target_modules": {}}}"#,
        serde_json::to_string(targets).unwrap()
    ))
    .unwrap();
    peft::io::save_adapter(dir, &config, &tensors).unwrap();
    dir.to_path_buf()
}

fn merge(base: &Path, adapter: &Path, out: &Path) -> peft_models::error::Result<GgufMergeReport> {
    let ad = MergeAdapter::load(adapter, None, &Device::Cpu).unwrap();
    merge_into_gguf(base, vec![ad], out, &mut |_, _, _| {})
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

struct Read {
    bytes: Vec<u8>,
    content: gguf_file::Content,
}

fn read(path: &Path) -> Read {
    let bytes = std::fs::read(path).unwrap();
    let content = gguf_file::Content::read(&mut std::io::Cursor::new(&bytes)).unwrap();
    Read { bytes, content }
}

impl Read {
    fn range(&self, name: &str) -> &[u8] {
        let i = &self.content.tensor_infos[name];
        let n = i.shape.elem_count() / i.ggml_dtype.block_size() * i.ggml_dtype.type_size();
        let s = (self.content.tensor_data_offset + i.offset) as usize;
        &self.bytes[s..s + n]
    }

    /// The tensor dequantized, q / k rows in HF order.
    fn hf(&self, name: &str) -> Tensor {
        let mut c = std::io::Cursor::new(&self.bytes);
        let t = self
            .content
            .tensor(&mut c, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        if name.contains("attn_q") {
            unpermute_qk(&t, HEADS).unwrap()
        } else if name.contains("attn_k") {
            unpermute_qk(&t, KV_HEADS).unwrap()
        } else {
            t
        }
    }
}

/// ΔW = alpha/r · B·A from the adapter file, for HF module `module`.
fn delta(adapter: &Path, module: &str) -> Tensor {
    let t = peft::io::read_safetensors(adapter.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let a = &t[&format!("base_model.model.{module}.lora_A.weight")];
    let b = &t[&format!("base_model.model.{module}.lora_B.weight")];
    (b.matmul(a).unwrap() * (ALPHA / R as f64)).unwrap()
}

/// Checks the merged file against the base: same header bytes (metadata, tensor infos), same types and
/// offsets, untouched tensors byte-identical, merged ones `requant(dequant(W) + ΔW)` and reported.
fn check_merged(base: &Path, out: &Path, adapter: &Path, report: &GgufMergeReport) {
    let (b, m) = (read(base), read(out));
    assert_eq!(b.bytes.len(), m.bytes.len());
    assert_eq!(b.content.tensor_data_offset, m.content.tensor_data_offset);
    let hdr = b.content.tensor_data_offset as usize;
    assert!(b.bytes[..hdr] == m.bytes[..hdr], "header bytes differ");
    let merged: Vec<&str> = report
        .tensors
        .iter()
        .map(|t| t.gguf_name.as_str())
        .collect();
    for (name, bi) in &b.content.tensor_infos {
        let mi = &m.content.tensor_infos[name];
        assert_eq!(
            (mi.ggml_dtype, mi.shape.dims(), mi.offset),
            (bi.ggml_dtype, bi.shape.dims(), bi.offset),
            "{name}"
        );
        if !merged.contains(&name.as_str()) {
            assert!(b.range(name) == m.range(name), "{name} changed");
            continue;
        }
        let rep = report
            .tensors
            .iter()
            .find(|t| t.gguf_name == *name)
            .unwrap();
        assert_eq!(rep.ggml_dtype, bi.ggml_dtype);
        let module = rep.hf_name.strip_suffix(".weight").unwrap();
        // W' computed here, independently of the merge code.
        let want = (b.hf(name) + delta(adapter, module)).unwrap();
        let got = m.hf(name);
        let err = max_diff(&got, &want);
        assert!(b.range(name) != m.range(name), "{name} unchanged");
        match bi.ggml_dtype {
            GgmlDType::F32 => {
                assert!(err <= 1e-6 * max_abs(&want).max(1.0), "{name}: {err}");
                assert!(rep.max_error <= 1e-6, "{name}: {}", rep.max_error);
            }
            dt => {
                // requant(W') computed here: equal but for the rare element a ~1e-7 difference in W' rounds
                // the other way.
                let stored = if name.contains("attn_q") {
                    permute_qk(&want, HEADS).unwrap()
                } else if name.contains("attn_k") {
                    permute_qk(&want, KV_HEADS).unwrap()
                } else {
                    want.clone()
                };
                let q = QTensor::quantize(&stored, dt).unwrap();
                let back = q.dequantize(&Device::Cpu).unwrap();
                let own_err = max_diff(&back, &stored);
                let back = if name.contains("attn_q") {
                    unpermute_qk(&back, HEADS).unwrap()
                } else if name.contains("attn_k") {
                    unpermute_qk(&back, KV_HEADS).unwrap()
                } else {
                    back
                };
                let g = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let w = back.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let differ = g.iter().zip(&w).filter(|(x, y)| x != y).count();
                assert!(
                    differ <= g.len() / 500,
                    "{name} {dt:?}: {differ} of {} differ",
                    g.len()
                );
                assert!(
                    err <= rep.max_error + 1e-6,
                    "{name}: {err} > {}",
                    rep.max_error
                );
                assert!(
                    (rep.max_error - own_err).abs() <= 1e-5 + 1e-3 * own_err,
                    "{name}: reported {} vs {own_err}",
                    rep.max_error
                );
                assert!(rep.max_error > 0.0, "{name}: {dt:?} should be lossy");
            }
        }
    }
}

#[test]
fn gguf_merge_keeps_types_untouched_bytes_and_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.gguf");
    let dtype_of = |g: &str| match g {
        "blk.0.attn_q.weight" => GgmlDType::Q4_1,
        "blk.1.attn_q.weight" | "blk.0.attn_k.weight" | "blk.1.attn_k.weight" => GgmlDType::Q8_0,
        "blk.0.attn_v.weight" => GgmlDType::F16,
        "blk.1.attn_v.weight" => GgmlDType::BF16,
        "blk.0.ffn_down.weight" => GgmlDType::Q4_0,
        "blk.1.ffn_down.weight" => GgmlDType::Q5_1,
        "blk.0.ffn_up.weight" => GgmlDType::Q8_0,
        _ => GgmlDType::F32,
    };
    write_base(&base, SMALL, "llama", &dtype_of);
    let adapter = write_lora(
        &tmp.path().join("lora"),
        SMALL,
        &["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
    );
    let out = tmp.path().join("merged.gguf");
    let mut calls = 0;
    let ad = MergeAdapter::load(&adapter, None, &Device::Cpu).unwrap();
    let report = merge_into_gguf(&base, vec![ad], &out, &mut |d, t, _| {
        assert!(d <= t);
        calls += 1;
    })
    .unwrap();
    assert_eq!(calls, 11);
    assert_eq!(report.tensors.len(), 10);
    assert_eq!(report.modules.len(), 10);
    assert_eq!(report.bytes, std::fs::metadata(&base).unwrap().len());
    check_merged(&base, &out, &adapter, &report);
    let by_type = report.max_error_by_type();
    let types: Vec<GgmlDType> = by_type.iter().map(|(d, _, _)| *d).collect();
    for dt in [
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::F16,
        GgmlDType::BF16,
        GgmlDType::F32,
        GgmlDType::Q4_0,
        GgmlDType::Q5_1,
    ] {
        assert!(types.contains(&dt), "{dt:?} in {by_type:?}");
    }
    assert!(report.requantized_blocks());
    // Q8_0 stays Q8_0 (and every other type its own): the merged file's types are the base's.
    let m = read(&out);
    for (g, _, _) in layout(SMALL) {
        assert_eq!(m.content.tensor_infos[&g].ggml_dtype, dtype_of(&g), "{g}");
    }
    // Nothing but the output in the directory (the temporary file was renamed).
    let mut names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["base.gguf", "lora", "merged.gguf"]);
}

#[test]
fn gguf_merge_logits_match_the_in_memory_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.gguf");
    // Block types and F32 only, so that the in-memory merge (block types re-quantized, floats kept f32)
    // computes the same weights as the file.
    let dtype_of = |g: &str| match g {
        "blk.0.attn_q.weight" | "blk.1.attn_v.weight" => GgmlDType::Q4_1,
        "blk.1.attn_q.weight" | "blk.0.attn_k.weight" | "blk.0.attn_v.weight" => GgmlDType::Q8_0,
        "blk.0.ffn_down.weight" | "blk.1.ffn_gate.weight" => GgmlDType::Q4_0,
        _ => GgmlDType::F32,
    };
    write_base(&base, SMALL, "llama", &dtype_of);
    let adapter = write_lora(
        &tmp.path().join("lora"),
        SMALL,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "down_proj",
        ],
    );
    let out = tmp.path().join("merged.gguf");
    let report = merge(&base, &adapter, &out).unwrap();
    assert_eq!(report.tensors.len(), 12);
    let dev = Device::Cpu;
    let opts = LoadOptions::default();
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 12, 7, 0, 19]], &dev).unwrap();
    let ctx = peft::ForwardCtx::eval();
    let logits = |m: &peft_models::llama::LlamaForCausalLM| {
        m.forward(ForwardInput::ids(&ids), &ctx)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let merged = load_model_with(&out, &dev, &opts).unwrap();
    let got = logits(&merged.model);
    let mut pm = with_adapters(
        load_model_with(&base, &dev, &opts).unwrap().model,
        std::slice::from_ref(&adapter),
        &dev,
    )
    .unwrap();
    let unmerged = logits(pm.model());
    let base_only = pm.with_adapters_disabled(|pm| logits(pm.model())).unwrap();
    let in_memory = pm.merge_and_unload(None).unwrap();
    let want = logits(&in_memory);
    let scale = max_abs(&want);
    let rel = max_diff(&got, &want) / scale;
    assert!(rel < 1e-4, "merged GGUF vs in-memory merge: relative {rel}");
    // And nearer the unmerged base + adapter than the base is: re-quantizing 4-bit blocks of these random
    // weights costs a fraction of the adapter's own effect (0.81 against 2.24 here).
    let loss = max_diff(&got, &unmerged);
    let effect = max_diff(&unmerged, &base_only);
    assert!(effect > 0.05, "{effect}");
    assert!(loss < 0.5 * effect, "loss {loss}, adapter effect {effect}");
}

#[test]
fn gguf_merge_into_k_quants() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.gguf");
    // llama.cpp's Q4_K_M: Q4_K for q, k, o, gate, up; Q6_K for v and down; F32 norms (and embedding here).
    let dtype_of = |g: &str| {
        if g.contains("attn_v") || g.contains("ffn_down") {
            GgmlDType::Q6K
        } else if g.starts_with("blk.") && !g.contains("norm") {
            GgmlDType::Q4K
        } else {
            GgmlDType::F32
        }
    };
    write_base(&base, KQUANT, "llama", &dtype_of);
    let adapter = write_lora(
        &tmp.path().join("lora"),
        KQUANT,
        &["q_proj", "k_proj", "v_proj", "down_proj"],
    );
    let out = tmp.path().join("merged.gguf");
    let report = merge(&base, &adapter, &out).unwrap();
    assert_eq!(report.tensors.len(), 4);
    check_merged(&base, &out, &adapter, &report);
    let by_type = report.max_error_by_type();
    assert_eq!(by_type.len(), 2, "{by_type:?}");
    for (dt, n, e) in by_type {
        assert!(matches!(dt, GgmlDType::Q4K | GgmlDType::Q6K) && n == 2 && e > 0.0);
    }
}

#[test]
fn gguf_merge_refusals_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.gguf");
    let q8 = |g: &str| {
        if g.contains("attn_q") {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        }
    };
    write_base(&base, SMALL, "llama", &q8);
    let out = tmp.path().join("out.gguf");

    // A module the GGUF lacks (layer 2 of a 2-layer model).
    let big = Dims { layers: 3, ..SMALL };
    let lora3 = write_lora(&tmp.path().join("lora3"), big, &["q_proj"]);
    let e = merge(&base, &lora3, &out).unwrap_err();
    assert!(
        e.to_string().contains("model.layers.2.self_attn.q_proj"),
        "{e}"
    );
    // A shape mismatch (hidden 256 adapter on a hidden 64 base).
    let wide = write_lora(&tmp.path().join("wide"), KQUANT, &["q_proj"]);
    let e = merge(&base, &wide, &out).unwrap_err();
    assert!(e.to_string().contains("q_proj"), "{e}");
    // Not llama.
    let qwen = tmp.path().join("qwen.gguf");
    write_base(&qwen, SMALL, "qwen2", &q8);
    let lora = write_lora(&tmp.path().join("lora"), SMALL, &["q_proj"]);
    let e = merge(&qwen, &lora, &out).unwrap_err();
    assert!(e.to_string().contains("`qwen2`"), "{e}");
    // A ggml type candle does not know (IQ4_NL, type 20, has Q4_0's block size and bytes): the file is
    // refused when read.
    let iq = tmp.path().join("iq.gguf");
    write_base(&iq, SMALL, "llama", &|g| {
        if g == "blk.0.attn_q.weight" {
            GgmlDType::Q4_0
        } else {
            GgmlDType::F32
        }
    });
    let mut bytes = std::fs::read(&iq).unwrap();
    let name = b"blk.0.attn_q.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    // n_dims u32, 2 × u64 dims, then the type.
    let ty = at + 4 + 16;
    assert_eq!(&bytes[ty..ty + 4], &2u32.to_le_bytes());
    bytes[ty..ty + 4].copy_from_slice(&20u32.to_le_bytes());
    std::fs::write(&iq, &bytes).unwrap();
    let e = merge(&iq, &lora, &out).unwrap_err();
    assert!(e.to_string().contains(&iq.display().to_string()), "{e}");
    // An adapter GGUF as the base; the output being the base; a truncated base.
    let adapter_gguf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/gguf_lora/cases/attn_r4/converter_f32.gguf");
    let e = merge(&adapter_gguf, &lora, &out).unwrap_err();
    assert!(e.to_string().contains("is an adapter"), "{e}");
    let e = merge(&base, &lora, &base).unwrap_err();
    assert!(e.to_string().contains("the output is the base"), "{e}");
    let cut = tmp.path().join("cut.gguf");
    let b = std::fs::read(&base).unwrap();
    std::fs::write(&cut, &b[..b.len() - 100]).unwrap();
    let e = merge(&cut, &lora, &out).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");
    assert!(!out.exists());
    // Nothing left behind by the failures.
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("out") || n.contains("tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// A weighted merge (`DIR@0.5`) goes through the same merge code: F32 tensors get exactly `W + 0.5·ΔW`, a
/// Q8_0 one stays Q8_0.
#[test]
fn gguf_merge_weighted_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.gguf");
    let dtype_of = |g: &str| {
        if g.contains("attn_q") {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        }
    };
    write_base(&base, SMALL, "llama", &dtype_of);
    let adapter = write_lora(&tmp.path().join("lora"), SMALL, &["q_proj", "o_proj"]);
    let out = tmp.path().join("merged.gguf");
    let ad = MergeAdapter::load(&adapter, Some(0.5), &Device::Cpu).unwrap();
    let report = merge_into_gguf(&base, vec![ad], &out, &mut |_, _, _| {}).unwrap();
    assert_eq!(report.tensors.len(), 4);
    let (b, m) = (read(&base), read(&out));
    for l in 0..SMALL.layers {
        let g = format!("blk.{l}.attn_output.weight");
        let want = (b.hf(&g)
            + (delta(&adapter, &format!("model.layers.{l}.self_attn.o_proj")) * 0.5).unwrap())
        .unwrap();
        let err = max_diff(&m.hf(&g), &want);
        assert!(err <= 1e-6, "{g}: {err}");
        let q = format!("blk.{l}.attn_q.weight");
        assert_eq!(m.content.tensor_infos[&q].ggml_dtype, GgmlDType::Q8_0);
        assert!(b.range(&q) != m.range(&q));
    }
}
