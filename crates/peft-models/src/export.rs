//! Writing a HuggingFace model directory that `transformers` (`AutoModelForCausalLM.from_pretrained`,
//! `AutoTokenizer.from_pretrained`) and candle-transformers load.

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Tensor};
use indexmap::IndexMap;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// The input embedding, which a tied output layer shares.
const EMBED: &str = "model.embed_tokens.weight";
/// The output layer's weight.
const LM_HEAD: &str = "lm_head.weight";

/// Writes `config.json`, `generation_config.json` (bos / eos / pad ids), `model.safetensors` (with
/// `{"format": "pt"}` metadata) and, with a tokenizer, `tokenizer.json` and `tokenizer_config.json` (with
/// the chat template) into `dir`.
///
/// Tied embeddings: without `lm_head.weight` the config gets `tie_word_embeddings: true`; with
/// `tie_word_embeddings: true` in the config, `lm_head.weight` is not written (it must then equal the
/// embedding). `torch_dtype` is set from the embedding's dtype, and missing `bos_token_id` / `eos_token_id` /
/// `pad_token_id` are filled from the tokenizer.
///
/// The files are assembled in a temporary directory next to `dir` and renamed into place: a new (or empty)
/// `dir` appears complete or not at all. Into an existing non-empty directory each file is renamed in
/// turn (other files there are kept; a stale `model.safetensors.index.json` is removed).
pub fn write_hf_dir(
    dir: impl AsRef<Path>,
    config: &Value,
    tensors: &IndexMap<String, Tensor>,
    tokenizer: Option<&Tokenizer>,
) -> Result<()> {
    let dir = dir.as_ref();
    let mut config = config
        .as_object()
        .cloned()
        .ok_or_else(|| ModelError::json("config", "the model config is not a JSON object"))?;

    // Tied embeddings.
    let has_head = tensors.contains_key(LM_HEAD);
    let tied = match config.get("tie_word_embeddings").and_then(Value::as_bool) {
        Some(t) => t || !has_head,
        None => !has_head,
    };
    let mut drop_head = false;
    if tied && has_head {
        let head = &tensors[LM_HEAD];
        let same = match tensors.get(EMBED) {
            Some(e) => e.dims() == head.dims() && max_abs_diff(e, head)? == 0.0,
            None => false,
        };
        if !same {
            return Err(ModelError::Invalid(format!(
                "tie_word_embeddings is true but {LM_HEAD} differs from {EMBED}; set it to false to keep a separate output layer"
            )));
        }
        drop_head = true;
    }
    if tied && !tensors.contains_key(EMBED) {
        return Err(ModelError::Invalid(format!(
            "no {LM_HEAD} and no {EMBED}: cannot write a causal LM without an output layer"
        )));
    }
    config.insert("tie_word_embeddings".into(), json!(tied));

    // dtype and special token ids.
    if let Some(t) = tensors.get(EMBED).or_else(|| tensors.values().next())
        && let Some(name) = torch_dtype_name(t.dtype())
    {
        config.insert("torch_dtype".into(), json!(name));
    }
    if let Some(tok) = tokenizer {
        for (key, id) in [
            ("bos_token_id", tok.bos_token_id()),
            ("eos_token_id", tok.eos_token_id()),
            ("pad_token_id", tok.pad_token_id()),
        ] {
            if let Some(id) = id
                && config.get(key).is_none_or(Value::is_null)
            {
                config.insert(key.into(), json!(id));
            }
        }
    }
    let mut generation = serde_json::Map::new();
    generation.insert("_from_model_config".into(), json!(true));
    for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
        if let Some(v) = config.get(key).filter(|v| !v.is_null()) {
            generation.insert(key.into(), v.clone());
        }
    }

    let to_write: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(k, _)| !(drop_head && k.as_str() == LM_HEAD))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();

    let json_text = |v: &Value, what: &str| {
        serde_json::to_string_pretty(v)
            .map(|s| s + "\n")
            .map_err(|e| ModelError::json(what, e))
    };
    let config_text = json_text(&Value::Object(config), "config.json")?;
    let generation_text = json_text(&Value::Object(generation), "generation_config.json")?;

    let tmp = tmp_dir(dir)?;
    let res = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
        peft::io::atomic_write(&tmp.join("config.json"), config_text.as_bytes())?;
        peft::io::atomic_write(
            &tmp.join("generation_config.json"),
            generation_text.as_bytes(),
        )?;
        peft::io::write_safetensors(tmp.join("model.safetensors"), &to_write)?;
        if let Some(tok) = tokenizer {
            tok.save_dir(&tmp)?;
        }
        place(&tmp, dir)
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

/// The `torch_dtype` string of a candle dtype.
pub fn torch_dtype_name(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => return None,
    })
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

fn tmp_dir(dir: &Path) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| ModelError::Invalid(format!("{}: not a directory name", dir.display())))?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| ModelError::io(&parent, e))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| ModelError::io(&tmp, e))?;
    }
    Ok(tmp)
}

/// Moves the assembled directory `tmp` to `dir`.
fn place(tmp: &Path, dir: &Path) -> Result<()> {
    if dir.exists() {
        if !dir.is_dir() {
            return Err(ModelError::Invalid(format!(
                "{}: exists and is not a directory",
                dir.display()
            )));
        }
        let empty = std::fs::read_dir(dir)
            .map_err(|e| ModelError::io(dir, e))?
            .next()
            .is_none();
        if empty {
            std::fs::remove_dir(dir).map_err(|e| ModelError::io(dir, e))?;
        } else {
            let stale = dir.join("model.safetensors.index.json");
            if stale.exists() {
                std::fs::remove_file(&stale).map_err(|e| ModelError::io(&stale, e))?;
            }
            for entry in std::fs::read_dir(tmp).map_err(|e| ModelError::io(tmp, e))? {
                let entry = entry.map_err(|e| ModelError::io(tmp, e))?;
                let to = dir.join(entry.file_name());
                std::fs::rename(entry.path(), &to).map_err(|e| ModelError::io(&to, e))?;
            }
            std::fs::remove_dir(tmp).map_err(|e| ModelError::io(tmp, e))?;
            return Ok(());
        }
    }
    std::fs::rename(tmp, dir).map_err(|e| ModelError::io(dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::load_gguf;
    use crate::gguf::tests::write_tiny_gguf;
    use crate::hf::{load_hf_dir, load_hf_tokenizer};
    use crate::tokenizer::ChatMessage;
    use candle_core::Device;

    fn same(a: &Tensor, b: &Tensor) -> bool {
        a.dims() == b.dims() && max_abs_diff(a, b).unwrap() == 0.0
    }

    fn read_json(p: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    #[test]
    fn export_then_load_hf_dir_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let (gguf, _) = write_tiny_gguf(tmp.path());
        let m = load_gguf(&gguf, &Device::Cpu).unwrap();
        let out = tmp.path().join("nested").join("tiny-hf");
        write_hf_dir(&out, &m.config, &m.tensors, Some(&m.tokenizer)).unwrap();

        let mut files: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                "config.json",
                "generation_config.json",
                "model.safetensors",
                "tokenizer.json",
                "tokenizer_config.json"
            ]
        );
        let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers.len(),
            1,
            "no temporary directory left: {leftovers:?}"
        );

        let st = peft::io::SafetensorsFile::open(out.join("model.safetensors")).unwrap();
        assert_eq!(st.metadata().unwrap()["format"], "pt");
        assert!(!st.contains("lm_head.weight"));
        let gen_cfg = read_json(&out.join("generation_config.json"));
        assert_eq!(gen_cfg["bos_token_id"], json!(1));
        assert_eq!(gen_cfg["eos_token_id"], json!(2));
        assert_eq!(gen_cfg["pad_token_id"], json!(2));
        let tok_cfg = read_json(&out.join("tokenizer_config.json"));
        assert_eq!(
            tok_cfg["chat_template"],
            json!(m.tokenizer.chat_template().unwrap())
        );
        assert_eq!(tok_cfg["eos_token"], json!("<|im_end|>"));

        let back = load_hf_dir(&out, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.config, {
            let mut c = m.config.clone();
            c["torch_dtype"] = json!("float32");
            c
        });
        assert_eq!(back.config["tie_word_embeddings"], json!(true));
        assert_eq!(back.tensors.len(), m.tensors.len());
        assert_eq!(
            back.tensors.keys().next().unwrap(),
            "model.embed_tokens.weight"
        );
        assert_eq!(back.tensors.keys().last().unwrap(), "model.norm.weight");
        for (k, t) in &m.tensors {
            assert!(same(t, &back.tensors[k]), "{k}");
        }
        let tok = back.tokenizer.unwrap();
        for text in ["abc ab 12\n", "<|im_start|>ab<tool> é"] {
            assert_eq!(
                tok.encode(text, true).unwrap(),
                m.tokenizer.encode(text, true).unwrap()
            );
        }
        let msgs = [ChatMessage::user("ab")];
        assert_eq!(
            tok.apply_chat_template(&msgs, true).unwrap(),
            m.tokenizer.apply_chat_template(&msgs, true).unwrap()
        );

        // The same directory in bf16: every tensor converted, values rounded once.
        let bf = load_hf_dir(&out, DType::BF16, &Device::Cpu).unwrap();
        for (k, t) in &bf.tensors {
            assert_eq!(t.dtype(), DType::BF16, "{k}");
            let want = m.tensors[k].to_dtype(DType::BF16).unwrap();
            assert!(same(t, &want), "{k}");
        }
    }

    #[test]
    fn export_tied_head_is_dropped_only_when_equal() {
        let tmp = tempfile::tempdir().unwrap();
        let (gguf, _) = write_tiny_gguf(tmp.path());
        let m = load_gguf(&gguf, &Device::Cpu).unwrap();
        let embed = m.tensors[EMBED].clone();

        // lm_head equal to the embedding with tie=true: not written.
        let mut tensors = m.tensors.clone();
        tensors.insert(LM_HEAD.into(), embed.clone());
        let out = tmp.path().join("tied");
        write_hf_dir(&out, &m.config, &tensors, None).unwrap();
        let st = peft::io::SafetensorsFile::open(out.join("model.safetensors")).unwrap();
        assert!(!st.contains(LM_HEAD));
        assert!(!out.join("tokenizer.json").exists());

        // A different lm_head with tie=true: an error, and nothing written.
        tensors.insert(LM_HEAD.into(), (embed.clone() * 2.0).unwrap());
        let bad = tmp.path().join("bad");
        let err = write_hf_dir(&bad, &m.config, &tensors, None).unwrap_err();
        assert!(err.to_string().contains("differs"), "{err}");
        assert!(!bad.exists());

        // With tie=false it is written and the config says so.
        let mut cfg = m.config.clone();
        cfg["tie_word_embeddings"] = json!(false);
        let untied = tmp.path().join("untied");
        write_hf_dir(&untied, &cfg, &tensors, None).unwrap();
        let back = load_hf_dir(&untied, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.config["tie_word_embeddings"], json!(false));
        assert!(same(&back.tensors[LM_HEAD], &tensors[LM_HEAD]));
        assert!(back.tokenizer.is_none());

        // No lm_head and tie=false in the config: tie is switched on (else transformers would init it).
        let untied_cfg_tied_out = tmp.path().join("forced-tie");
        write_hf_dir(&untied_cfg_tied_out, &cfg, &m.tensors, None).unwrap();
        let c = read_json(&untied_cfg_tied_out.join("config.json"));
        assert_eq!(c["tie_word_embeddings"], json!(true));
        let mut leftovers: Vec<String> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        leftovers.sort();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn export_into_existing_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let (gguf, _) = write_tiny_gguf(tmp.path());
        let m = load_gguf(&gguf, &Device::Cpu).unwrap();
        // An empty directory is replaced as a whole.
        let empty = tmp.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        write_hf_dir(&empty, &m.config, &m.tensors, Some(&m.tokenizer)).unwrap();
        assert!(empty.join("model.safetensors").is_file());
        // A non-empty one keeps its other files, loses a stale index, and gets the new files.
        let busy = tmp.path().join("busy");
        std::fs::create_dir(&busy).unwrap();
        std::fs::write(busy.join("README.md"), "keep me").unwrap();
        std::fs::write(busy.join("model.safetensors.index.json"), "{}").unwrap();
        std::fs::write(busy.join("config.json"), "old").unwrap();
        write_hf_dir(&busy, &m.config, &m.tensors, Some(&m.tokenizer)).unwrap();
        assert_eq!(
            std::fs::read_to_string(busy.join("README.md")).unwrap(),
            "keep me"
        );
        assert!(!busy.join("model.safetensors.index.json").exists());
        assert_eq!(
            read_json(&busy.join("config.json"))["model_type"],
            json!("llama")
        );
        assert!(load_hf_dir(&busy, DType::F32, &Device::Cpu).is_ok());
        // A file in the way is an error.
        let file = tmp.path().join("file");
        std::fs::write(&file, "x").unwrap();
        let e = write_hf_dir(&file, &m.config, &m.tensors, None).unwrap_err();
        assert!(
            matches!(&e, ModelError::Invalid(s) if s.ends_with("file: exists and is not a directory")),
            "{e}"
        );
        let e = write_hf_dir(tmp.path().join("x"), &json!([1]), &m.tensors, None).unwrap_err();
        assert!(
            matches!(&e, ModelError::Json { context, message } if context == "config" && message.contains("not a JSON object")),
            "{e}"
        );
    }

    #[test]
    fn load_hf_dir_sharded_and_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sharded");
        std::fs::create_dir(&dir).unwrap();
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::arange(0f32, 4.0, &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let c = Tensor::new(&[1i64, 2], &dev).unwrap();
        peft::io::write_safetensors(
            dir.join("model-00001-of-00002.safetensors"),
            &[("a".into(), a.clone())],
        )
        .unwrap();
        peft::io::write_safetensors(
            dir.join("model-00002-of-00002.safetensors"),
            &[("b".into(), b.clone()), ("c".into(), c.clone())],
        )
        .unwrap();
        let index = json!({"metadata": {"total_size": 48}, "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors"}});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        // No config.json yet.
        let err = load_hf_dir(&dir, DType::F32, &dev).unwrap_err();
        assert!(err.to_string().contains("no config.json"), "{err}");
        std::fs::write(dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
        let m = load_hf_dir(&dir, DType::F32, &dev).unwrap();
        assert_eq!(m.tensors.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(m.tensors["b"].dtype(), DType::F32);
        assert_eq!(
            m.tensors["c"].dtype(),
            DType::I64,
            "integer tensors keep their dtype"
        );
        assert!(same(&m.tensors["a"], &a));
        assert!(m.tokenizer.is_none());
        // The index names a tensor no shard has.
        let mut index = index.clone();
        index["weight_map"]["d"] = json!("model-00002-of-00002.safetensors");
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let err = load_hf_dir(&dir, DType::F32, &dev).unwrap_err();
        assert!(err.to_string().contains("no shard holds: d"), "{err}");
        // A truncated shard.
        std::fs::write(dir.join("model-00001-of-00002.safetensors"), b"\x10\0\0").unwrap();
        let e = load_hf_dir(&dir, DType::F32, &dev).unwrap_err();
        assert!(
            matches!(&e, ModelError::Peft(peft::PeftError::SafeTensors { path, .. }) if path.ends_with("model-00001-of-00002.safetensors")),
            "{e}"
        );
        let e = load_hf_dir(tmp.path().join("absent"), DType::F32, &dev).unwrap_err();
        assert!(
            matches!(&e, ModelError::Invalid(s) if s.ends_with("absent: not a model directory")),
            "{e}"
        );
    }

    #[test]
    fn load_hf_tokenizer_uses_jinja_file_and_config_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let (gguf, _) = write_tiny_gguf(tmp.path());
        let m = load_gguf(&gguf, &Device::Cpu).unwrap();
        let dir = tmp.path().join("tok");
        std::fs::create_dir(&dir).unwrap();
        m.tokenizer.save(dir.join("tokenizer.json")).unwrap();
        assert!(load_hf_tokenizer(tmp.path(), None).unwrap().is_none());
        // No tokenizer_config.json: ids from config.json, template from chat_template.jinja.
        std::fs::write(dir.join("chat_template.jinja"), "{{ bos_token }}X").unwrap();
        let cfg = json!({"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": null});
        let tok = load_hf_tokenizer(&dir, Some(&cfg)).unwrap().unwrap();
        assert_eq!(tok.bos_token(), Some("<|im_start|>"));
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        assert_eq!(tok.pad_token(), None);
        assert_eq!(
            tok.apply_chat_template(&[], false).unwrap(),
            "<|im_start|>X"
        );
        // A broken tokenizer_config.json is an error naming the file.
        std::fs::write(dir.join("tokenizer_config.json"), "{").unwrap();
        let err = load_hf_tokenizer(&dir, None).unwrap_err();
        assert!(err.to_string().contains("tokenizer_config.json"), "{err}");
    }
}
