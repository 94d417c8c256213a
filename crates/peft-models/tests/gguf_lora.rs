//! `peft_models::gguf_lora` against llama.cpp's own `convert_lora_to_gguf.py` (fixtures/gguf_lora, written by
//! gen_gguf_lora.py): the same bytes for f32, f16 and q8_0, metadata and tensors read back, rsLoRA's alpha, a
//! GGUF base, and the refusals.

use candle_core::quantized::gguf_file::{self, Value as GgufValue};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use peft_models::error::ModelError;
use peft_models::gguf_lora::{
    LoraGguf, LoraGgufBase, LoraGgufValue, LoraOutType, export_lora_gguf, read_lora_gguf,
};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

const TYPES: [(LoraOutType, &str); 3] = [
    (LoraOutType::F32, "f32"),
    (LoraOutType::F16, "f16"),
    (LoraOutType::Q8_0, "q8_0"),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn case(name: &str) -> PathBuf {
    root().join("fixtures/gguf_lora/cases").join(name)
}

fn hf_base() -> PathBuf {
    root().join("fixtures/models/cases/llama_gqa")
}

fn export(adapter: &Path, base: &LoraGgufBase, t: LoraOutType, out: &Path) -> LoraGguf {
    export_lora_gguf(adapter, base, t, out).unwrap_or_else(|e| panic!("{}: {e}", adapter.display()))
}

/// The keys llama.cpp's adapter loader reads, and the quantization version, with their values.
fn loader_metadata(g: &LoraGguf) -> Vec<(String, LoraGgufValue)> {
    g.metadata
        .iter()
        .filter(|(k, _)| k != "general.name")
        .cloned()
        .collect()
}

#[test]
fn gguf_lora_files_are_byte_identical_to_the_converter() {
    let base = LoraGgufBase::from_path(hf_base()).unwrap();
    assert_eq!(
        base,
        LoraGgufBase {
            architecture: "llama".into(),
            n_head: 8,
            n_kv_head: 2,
            tied_embeddings: false
        }
    );
    let tmp = tempfile::tempdir().unwrap();
    for name in ["attn_r4", "mlp_embed_r32"] {
        for (t, ts) in TYPES {
            let out = tmp.path().join(format!("{name}_{ts}.gguf"));
            let written = export(&case(name).join("adapter"), &base, t, &out);
            let theirs_path = case(name).join(format!("converter_{ts}.gguf"));
            let ours = std::fs::read(&out).unwrap();
            let theirs = std::fs::read(&theirs_path).unwrap();
            assert!(
                ours == theirs,
                "{name} {ts}: bytes differ from the converter's"
            );
            // Read back: what was written, and what the converter wrote.
            let back = read_lora_gguf(&out).unwrap();
            let conv = read_lora_gguf(&theirs_path).unwrap();
            assert_eq!(back, conv);
            assert_eq!(back.tensors, written.tensors);
            let mut md = written.metadata.clone();
            md.sort_by(|a, b| a.0.cmp(&b.0));
            assert_eq!(back.metadata, md);
        }
    }
    // The dtype rules and the shapes, spelled out on one file each.
    let g = read_lora_gguf(case("attn_r4").join("converter_q8_0.gguf")).unwrap();
    let q = g.tensor("blk.0.attn_q.weight.lora_a").unwrap();
    assert_eq!(
        (q.shape.as_slice(), q.dtype),
        (&[4, 64][..], GgmlDType::Q8_0)
    );
    let k = g.tensor("blk.1.attn_k.weight.lora_b").unwrap();
    assert_eq!(
        (k.shape.as_slice(), k.dtype),
        (&[16, 2][..], GgmlDType::F16)
    );
    let g = read_lora_gguf(case("mlp_embed_r32").join("converter_q8_0.gguf")).unwrap();
    let e = g.tensor("token_embd.weight.lora_a").unwrap();
    assert_eq!(
        (e.shape.as_slice(), e.dtype),
        (&[96, 32][..], GgmlDType::Q8_0)
    );
    assert_eq!(g.tensor("output.weight.lora_b").unwrap().shape, [96, 32]);
}

/// PEFT's tensors in the file: A and B as saved, token_embd's A transposed, the q / k B rows permuted by heads.
#[test]
fn gguf_lora_tensors_are_peft_tensors_with_the_llama_cpp_layout() {
    let dev = Device::Cpu;
    let base = LoraGgufBase::from_path(hf_base()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["attn_r4", "mlp_embed_r32"] {
        let dir = case(name).join("adapter");
        let g = export(&dir, &base, LoraOutType::F32, &tmp.path().join("x.gguf"));
        let file = peft::io::load_adapter(&dir, &dev).unwrap();
        let get = |k: &str| file.tensors[&format!("base_model.model.{k}")].clone();
        let in_file = |n: &str| {
            let t = g.tensor(n).unwrap_or_else(|| panic!("{n}"));
            Tensor::from_vec(t.to_f32().unwrap(), t.shape.clone(), &dev).unwrap()
        };
        let same = |a: &Tensor, b: &Tensor, what: &str| {
            assert_eq!(a.dims(), b.dims(), "{what}");
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{what}");
        };
        if name == "attn_r4" {
            for l in 0..2 {
                let p = format!("model.layers.{l}.self_attn");
                for (hf, gg, heads) in [("q_proj", "attn_q", 8), ("k_proj", "attn_k", 2)] {
                    let b = get(&format!("{p}.{hf}.lora_B.weight"));
                    let permuted = peft_models::gguf::permute_qk(&b, heads).unwrap();
                    let ours = in_file(&format!("blk.{l}.{gg}.weight.lora_b"));
                    same(&ours, &permuted, gg);
                    let moved = (&ours - &b).unwrap().abs().unwrap().max_all().unwrap();
                    assert!(
                        moved.to_scalar::<f32>().unwrap() > 0.0,
                        "{gg}: rows permuted"
                    );
                    same(
                        &in_file(&format!("blk.{l}.{gg}.weight.lora_a")),
                        &get(&format!("{p}.{hf}.lora_A.weight")),
                        gg,
                    );
                }
                same(
                    &in_file(&format!("blk.{l}.attn_v.weight.lora_b")),
                    &get(&format!("{p}.v_proj.lora_B.weight")),
                    "v",
                );
            }
            assert_eq!(g.alpha(), Some(8.0));
        } else {
            same(
                &in_file("token_embd.weight.lora_a"),
                &get("model.embed_tokens.lora_embedding_A").t().unwrap(),
                "embedding A transposed",
            );
            same(
                &in_file("token_embd.weight.lora_b"),
                &get("model.embed_tokens.lora_embedding_B"),
                "embedding B",
            );
            same(
                &in_file("output.weight.lora_a"),
                &get("lm_head.lora_A.weight"),
                "lm_head",
            );
            assert_eq!(g.alpha(), Some(16.0));
        }
    }
}

#[test]
fn gguf_lora_rslora_alpha_is_alpha_sqrt_r() {
    // The converter ignores use_rslora (its alpha is lora_alpha = 4): the tensors are the same, the alpha is
    // 4·√8 so that llama.cpp's alpha / r equals PEFT's 4 / √8.
    let base = LoraGgufBase::from_path(hf_base()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    for (t, ts) in TYPES {
        let out = tmp.path().join(format!("rs_{ts}.gguf"));
        export(&case("rslora_r8").join("adapter"), &base, t, &out);
        let ours = read_lora_gguf(&out).unwrap();
        let conv = read_lora_gguf(case("rslora_r8").join(format!("converter_{ts}.gguf"))).unwrap();
        assert_eq!(ours.tensors, conv.tensors, "{ts}");
        assert_eq!(conv.alpha(), Some(4.0));
        assert_eq!(ours.alpha(), Some((4.0f64 * 8f64.sqrt()) as f32));
        let strip = |g: &LoraGguf| {
            loader_metadata(g)
                .into_iter()
                .filter(|(k, _)| k != "adapter.lora.alpha")
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&ours), strip(&conv));
    }
}

/// A GGUF model file as the base: the same output, read from its metadata and tensor names.
#[test]
fn gguf_lora_with_a_gguf_base() {
    let tmp = tempfile::tempdir().unwrap();
    let write_base = |path: &Path, arch: &str, with_output: bool| {
        let md = [
            ("general.architecture", GgufValue::String(arch.into())),
            (
                if arch == "llama" {
                    "llama.attention.head_count"
                } else {
                    "qwen2.attention.head_count"
                },
                GgufValue::U32(8),
            ),
            ("llama.attention.head_count_kv", GgufValue::U32(2)),
        ];
        let t = Tensor::zeros((96, 64), DType::F32, &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let mut tensors = vec![("token_embd.weight", &q)];
        if with_output {
            tensors.push(("output.weight", &q));
        }
        let md_refs: Vec<(&str, &GgufValue)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &md_refs, &tensors).unwrap();
    };
    let untied = tmp.path().join("base.gguf");
    write_base(&untied, "llama", true);
    let base = LoraGgufBase::from_path(&untied).unwrap();
    assert_eq!(
        (base.n_head, base.n_kv_head, base.tied_embeddings),
        (8, 2, false)
    );
    let out = tmp.path().join("a.gguf");
    export(
        &case("mlp_embed_r32").join("adapter"),
        &base,
        LoraOutType::Q8_0,
        &out,
    );
    assert!(
        std::fs::read(&out).unwrap()
            == std::fs::read(case("mlp_embed_r32").join("converter_q8_0.gguf")).unwrap()
    );

    // Tied embeddings: llama.cpp's output layer is token_embd itself.
    let tied = tmp.path().join("tied.gguf");
    write_base(&tied, "llama", false);
    let base = LoraGgufBase::from_path(&tied).unwrap();
    assert!(base.tied_embeddings);
    let out = tmp.path().join("tied_out.gguf");
    let e = export_lora_gguf(
        case("mlp_embed_r32").join("adapter"),
        &base,
        LoraOutType::F32,
        &out,
    )
    .unwrap_err();
    assert!(
        matches!(&e, ModelError::Unsupported(m) if m.contains("lm_head") && m.contains("tied")),
        "{e}"
    );
    assert!(!out.exists());
    // Attention-only adapters are fine on a tied base.
    export(
        &case("attn_r4").join("adapter"),
        &base,
        LoraOutType::F32,
        &out,
    );

    let qwen = tmp.path().join("qwen.gguf");
    write_base(&qwen, "qwen2", true);
    let e = LoraGgufBase::from_path(&qwen).unwrap_err();
    assert!(
        matches!(&e, ModelError::Unsupported(m) if m.contains("`qwen2`")),
        "{e}"
    );
    let e = LoraGgufBase::from_path(case("attn_r4").join("converter_f32.gguf")).unwrap_err();
    assert!(e.to_string().contains("is an adapter"), "{e}");
}

/// Copies an adapter with its config edited by `edit` (and its tensors by `tensors`).
fn edited_adapter(
    tmp: &Path,
    from: &str,
    edit: impl FnOnce(&mut Value),
    tensors: impl FnOnce(&mut Vec<(String, Tensor)>),
) -> PathBuf {
    let src = case(from).join("adapter");
    let dir = tmp.join(format!("edited-{}", rand_name()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("adapter_config.json")).unwrap())
            .unwrap();
    edit(&mut cfg);
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    let file = peft::io::SafetensorsFile::open(src.join("adapter_model.safetensors")).unwrap();
    let mut ts: Vec<(String, Tensor)> = file.load_all(&Device::Cpu).unwrap().into_iter().collect();
    tensors(&mut ts);
    peft::io::write_safetensors(dir.join("adapter_model.safetensors"), &ts).unwrap();
    dir
}

fn rand_name() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

#[test]
fn gguf_lora_refuses_what_llama_cpp_cannot_express() {
    let tmp = tempfile::tempdir().unwrap();
    let base = LoraGgufBase::from_path(hf_base()).unwrap();
    let out = tmp.path().join("out.gguf");
    std::fs::write(&out, b"keep me").unwrap();
    let refused = |dir: &Path, needles: &[&str]| {
        let e = export_lora_gguf(dir, &base, LoraOutType::F16, &out).unwrap_err();
        let m = e.to_string();
        for n in needles {
            assert!(m.contains(n), "{n:?} not in {m}");
        }
        assert_eq!(
            std::fs::read(&out).unwrap(),
            b"keep me",
            "{m}: output untouched"
        );
    };
    let none = |_: &mut Vec<(String, Tensor)>| {};
    // Per-module alphas that no single file alpha gives.
    let d = edited_adapter(
        tmp.path(),
        "attn_r4",
        |c| c["alpha_pattern"] = json!({"q_proj": 16}),
        none,
    );
    refused(&d, &["one alpha per file", "q_proj", "alpha_pattern"]);
    // rsLoRA with per-module ranks: alpha·√r differs.
    let d = edited_adapter(
        tmp.path(),
        "attn_r4",
        |c| c["use_rslora"] = json!(true),
        none,
    );
    refused(&d, &["one alpha per file", "rsLoRA"]);
    // An alpha_pattern that agrees with lora_alpha is fine; so are the per-module ranks alone (attn_r4).
    let d = edited_adapter(
        tmp.path(),
        "attn_r4",
        |c| c["alpha_pattern"] = json!({"q_proj": 8}),
        none,
    );
    let ok = tmp.path().join("ok.gguf");
    export(&d, &base, LoraOutType::F32, &ok);
    let (ours, conv) = (
        read_lora_gguf(&ok).unwrap(),
        read_lora_gguf(case("attn_r4").join("converter_f32.gguf")).unwrap(),
    );
    assert_eq!(ours.tensors, conv.tensors);
    assert_eq!(loader_metadata(&ours), loader_metadata(&conv));
    assert_eq!(
        ours.get("general.name"),
        Some(&LoraGgufValue::String(format!(
            "Edited {}",
            d.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .trim_start_matches("edited-")
        )))
    );
    // DoRA.
    let d = edited_adapter(tmp.path(), "attn_r4", |c| c["use_dora"] = json!(true), none);
    refused(&d, &["use_dora", "DoRA"]);
    // modules_to_save, and whole tensors in the file.
    let d = edited_adapter(
        tmp.path(),
        "attn_r4",
        |c| c["modules_to_save"] = json!(["lm_head"]),
        none,
    );
    refused(&d, &["modules_to_save", "lm_head"]);
    let d = edited_adapter(
        tmp.path(),
        "attn_r4",
        |_| {},
        |ts| {
            let w = Tensor::ones(64, DType::F32, &Device::Cpu).unwrap();
            ts.push(("base_model.model.model.norm.weight".into(), w));
        },
    );
    refused(
        &d,
        &[
            "replaces whole tensors",
            "base_model.model.model.norm.weight",
        ],
    );
    // Bias training.
    let d = edited_adapter(tmp.path(), "attn_r4", |c| c["bias"] = json!("all"), none);
    refused(&d, &["bias", "all"]);
    // Alpha 0.
    let d = edited_adapter(tmp.path(), "attn_r4", |c| c["lora_alpha"] = json!(0), none);
    refused(&d, &["lora_alpha 0"]);
    // Another method.
    let ia3 = root().join("fixtures/ia3/cases/ia3_linear/adapter");
    refused(&ia3, &["peft_type IA3", "LoRA only"]);
    // Another architecture.
    let e = LoraGgufBase::from_path(root().join("fixtures/models/cases/qwen2")).unwrap_err();
    assert!(
        matches!(&e, ModelError::Unsupported(m) if m.contains("Qwen2ForCausalLM")),
        "{e}"
    );
    // No temporary file left next to the output.
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".gguf") || n.contains("tmp"))
        .collect();
    let mut left = left;
    left.sort();
    assert_eq!(left, ["ok.gguf", "out.gguf"]);
}
