//! SentencePiece tokenizers described by GGUF metadata (`tokenizer.ggml.model = "llama"`: Llama 2, TinyLlama,
//! Mistral, …), built as a [`tokenizers::Tokenizer`] the way `transformers` builds one for a GGUF file
//! (`integrations/gguf/gguf_tokenizer_mapping.py` → `LlamaTokenizer`), with llama.cpp's word-boundary rule.
//!
//! - Model: BPE over `tokenizer.ggml.tokens` with byte fallback (`<0xXX>` tokens). The merges are
//!   `tokenizer.ggml.merges` when present, otherwise recovered from the vocabulary and
//!   `tokenizer.ggml.scores` exactly as `transformers`' `generate_merges` does ([`merges_from_scores`]):
//!   every split of every token into two tokens, best score first.
//! - Special tokens: control (type 3) and unknown (type 2) tokens, and bos / eos / unk / pad, are special
//!   added tokens, matched whole in the text and dropped by `skip_special_tokens`; user-defined tokens
//!   (type 4) are plain added tokens, always matched whole; byte (6) and unused (5) tokens are only vocabulary.
//! - Word boundary: spaces become `▁`, and with `tokenizer.ggml.add_space_prefix` (default true) every piece of
//!   text — the start of the text and each stretch after a special or user-defined token — gets one `▁` in
//!   front, always. This is llama.cpp's `llama_tokenize` (and SentencePiece's dummy prefix). `transformers`
//!   5.24 uses a `Metaspace(prepend_scheme="first")` pre-tokenizer instead, which adds the `▁` only at the very
//!   start of the text and not when the text already starts with a space: `" Hi"` is `▁▁Hi` here and in
//!   llama.cpp and SentencePiece, `▁Hi` in `transformers`; `"<s>Hi"` is `<s> ▁Hi` here and in llama.cpp,
//!   `<s> Hi` in `transformers`; `"<tool>x"` with a user-defined `<tool>` is `<tool> ▁x` here and in
//!   llama.cpp, `<tool> x` in `transformers` and SentencePiece. Elsewhere the ids are the same. (Checked: the
//!   fixture's 23 texts, llama.cpp's own 46-text test on the real Llama 2 vocabulary, and 3,781 more texts
//!   on that vocabulary against llama.cpp through node-llama-cpp: see `llama_cpp_vocab_test_llama_spm`.)
//! - Not handled: the per-architecture variants `transformers` has for SentencePiece GGUF files (Gemma's
//!   respelled space tokens and position-ordered merges, llama.cpp's rstrip of Phi-3's special tokens).
//! - Decoder (as `transformers`): `▁` → space, byte tokens → bytes, and with the space prefix, one leading
//!   space removed.
//! - bos / eos / unk default to ids 1 / 2 / 0 when the metadata has no id (llama.cpp's defaults for this
//!   model); `tokenizer.ggml.add_bos_token` defaults to true and `add_eos_token` to false (llama.cpp and
//!   `transformers` alike).

use super::{Tokenizer, post_processor};
use crate::error::{ModelError, Result};
use crate::gguf::Meta;
use candle_core::quantized::gguf_file::Value as GgufValue;
use serde_json::json;
use std::cmp::Ordering;
use std::collections::HashMap;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::ModelWrapper;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::{AddedToken, TokenizerBuilder};

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
const UNKNOWN: u64 = 2;
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

/// SentencePiece's word-boundary mark.
const SPIECE: &str = "\u{2581}";

/// Builds the SentencePiece tokenizer of GGUF metadata whose `tokenizer.ggml.model` is `llama`; `tokens` and
/// `types` are `tokenizer.ggml.tokens` and `tokenizer.ggml.token_type` (already checked to match).
pub(super) fn from_gguf(meta: &Meta<'_>, tokens: &[&str], types: &[u64]) -> Result<Tokenizer> {
    let terr = |m: String| ModelError::Tokenizer(m);
    let merges = match meta.array("tokenizer.ggml.merges")? {
        Some(list) => super::parse_merges(list)?,
        None => {
            let scores = meta.array("tokenizer.ggml.scores")?.ok_or_else(|| {
                terr("a `llama` (SentencePiece) GGUF tokenizer needs `tokenizer.ggml.scores` or `tokenizer.ggml.merges`".into())
            })?;
            let scores: Vec<f32> = scores
                .iter()
                .map(|v| match v {
                    GgufValue::F32(x) => Ok(*x),
                    GgufValue::F64(x) => Ok(*x as f32),
                    _ => Err(terr("`tokenizer.ggml.scores` holds a non-float".into())),
                })
                .collect::<Result<_>>()?;
            if scores.len() != tokens.len() {
                return Err(terr(format!(
                    "{} token scores for {} tokens",
                    scores.len(),
                    tokens.len()
                )));
            }
            merges_from_scores(tokens, &scores)
        }
    };

    // Duplicates keep their last id, as both `transformers` ({token: index}) and llama.cpp do.
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), i as u32);
    }

    let id_token = |key: &str, default: Option<u64>| -> Result<Option<String>> {
        let id = match meta.uint(key)? {
            Some(id) => id,
            None => match default {
                Some(d) if (d as usize) < tokens.len() => d,
                _ => return Ok(None),
            },
        };
        Ok(Some(
            tokens
                .get(id as usize)
                .ok_or_else(|| terr(format!("`{key}` = {id} is outside the vocabulary")))?
                .to_string(),
        ))
    };
    let bos = id_token("tokenizer.ggml.bos_token_id", Some(1))?;
    let eos = id_token("tokenizer.ggml.eos_token_id", Some(2))?;
    let unk = id_token("tokenizer.ggml.unknown_token_id", Some(0))?;
    let pad = id_token("tokenizer.ggml.padding_token_id", None)?;
    let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(true);
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let add_space_prefix = meta
        .bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true);

    let mut bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    // Only reached for a character that is neither in the vocabulary nor spelled by byte tokens (every
    // SentencePiece byte-fallback vocabulary has all 256): `transformers` drops it, this keeps an unknown.
    if let Some(u) = &unk {
        bpe = bpe.unk_token(u.clone());
    }
    let bpe = bpe
        .build()
        .map_err(|e| terr(format!("cannot build BPE from GGUF metadata: {e}")))?;

    let replace = NormalizerWrapper::Replace(
        Replace::new(" ", SPIECE).map_err(|e| terr(format!("normalizer: {e}")))?,
    );
    let normalizer = if add_space_prefix {
        NormalizerWrapper::Sequence(NormalizerSequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new(SPIECE.to_string())),
            replace,
        ]))
    } else {
        replace
    };
    let mut decoders = vec![
        DecoderWrapper::Replace(
            Replace::new(SPIECE, " ").map_err(|e| terr(format!("decoder: {e}")))?,
        ),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    let post = if (add_bos && bos.is_some()) || (add_eos && eos.is_some()) {
        Some(post_processor(
            add_bos.then(|| bos.clone()).flatten(),
            add_eos.then(|| eos.clone()).flatten(),
            &|t| tokens.iter().rposition(|x| *x == t).map(|i| i as u32),
        )?)
    } else {
        None
    };

    let inner: tokenizers::TokenizerImpl<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(bpe.into())
        .with_normalizer(Some(normalizer))
        .with_pre_tokenizer(None)
        .with_post_processor(post)
        .with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(
            decoders,
        ))))
        .build()
        .map_err(|e| terr(e.to_string()))?;
    let mut inner = tokenizers::Tokenizer::from(inner);

    let named: Vec<&String> = [&bos, &eos, &unk, &pad].into_iter().flatten().collect();
    let mut special: Vec<AddedToken> = Vec::new();
    for (t, ty) in tokens.iter().zip(types) {
        if (*ty == CONTROL || *ty == UNKNOWN || named.iter().any(|n| n == t))
            && !special.iter().any(|a| a.content == *t)
        {
            special.push(AddedToken::from(t.to_string(), true));
        }
    }
    let user: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(t, ty)| **ty == USER_DEFINED && !special.iter().any(|a| a.content == **t))
        .map(|(t, _)| AddedToken::from(t.to_string(), false).normalized(false))
        .collect();
    inner.add_special_tokens(&special);
    inner.add_tokens(&user);

    let mut tok = Tokenizer::new(inner);
    tok.bos_token = bos;
    tok.eos_token = eos;
    tok.pad_token = pad;
    tok.unk_token = unk;
    tok.chat_template = meta.string("tokenizer.chat_template")?.map(str::to_string);
    tok.config
        .insert("clean_up_tokenization_spaces".into(), json!(false));
    tok.config.insert("add_bos_token".into(), json!(add_bos));
    tok.config.insert("add_eos_token".into(), json!(add_eos));
    if let Some(n) = meta.uint("llama.context_length")? {
        tok.config.insert("model_max_length".into(), json!(n));
    }
    tok.config
        .insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    Ok(tok)
}

/// The BPE merges a SentencePiece vocabulary implies, as `transformers`' `generate_merges(vocab, scores)`
/// computes them: for each distinct token (in order of first appearance, with the score of its last
/// appearance), every split into a left and a right token that are both in the vocabulary, those of one
/// token ordered by (left id, right id); then all of them, stably, by descending (score, left length, right
/// length), lengths in characters.
pub(crate) fn merges_from_scores(tokens: &[&str], scores: &[f32]) -> Vec<(String, String)> {
    let mut vocab: HashMap<&str, u32> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t, i as u32);
    }
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    for (t, s) in tokens.iter().zip(scores) {
        if score_of.insert(t, *s).is_none() {
            order.push(t);
        }
    }
    struct Merge<'a> {
        left: &'a str,
        right: &'a str,
        score: f32,
        left_len: usize,
        right_len: usize,
    }
    let mut merges: Vec<Merge<'_>> = Vec::new();
    for t in order {
        let score = score_of[t];
        let mut local: Vec<(u32, u32, &str, &str)> = t
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = t.split_at(at);
                Some((*vocab.get(l)?, *vocab.get(r)?, l, r))
            })
            .collect();
        local.sort_by_key(|&(il, ir, _, _)| (il, ir));
        merges.extend(local.into_iter().map(|(_, _, left, right)| Merge {
            left,
            right,
            score,
            left_len: left.chars().count(),
            right_len: right.chars().count(),
        }));
    }
    merges.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(Ordering::Equal)
            .then(b.left_len.cmp(&a.left_len))
            .then(b.right_len.cmp(&a.right_len))
    });
    merges
        .into_iter()
        .map(|m| (m.left.to_string(), m.right.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::ChatMessage;
    use candle_core::Device;
    use candle_core::quantized::gguf_file;
    use serde_json::Value;
    use std::path::{Path, PathBuf};

    fn fixture_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/spm_tokenizer")
    }

    fn expected() -> Value {
        let text = std::fs::read_to_string(fixture_dir().join("expected.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap_or_else(|| panic!("not a list: {v}"))
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    fn metadata() -> HashMap<String, GgufValue> {
        let mut f = std::fs::File::open(fixture_dir().join("tiny_spm.gguf")).unwrap();
        gguf_file::Content::read(&mut f).unwrap().metadata
    }

    /// The texts whose ids differ between llama.cpp (which we follow) and `transformers` 5.24: those that
    /// start with a space, and those with text right after a special or user-defined token.
    const DIFFERENT_FROM_TRANSFORMERS: [&str; 9] = [
        " leading space",
        "  two leading spaces",
        "   ",
        " ",
        "<s>Hello</s>",
        "<s> Hello world</s>",
        "<|im_start|>user\nWhat light?<|im_end|>\n<|im_start|>assistant\n",
        "a <tool> call<tool>x",
        "<unk> unknown",
    ];

    #[test]
    fn spm_gguf_loads_and_encodes_like_llama_cpp() {
        let e = expected();
        let m = crate::gguf::load_gguf(fixture_dir().join("tiny_spm.gguf"), &Device::Cpu).unwrap();
        let tok = &m.tokenizer;
        assert_eq!(m.config["vocab_size"], e["vocab_size"]);
        assert_eq!(tok.vocab_size() as u64, e["vocab_size"].as_u64().unwrap());
        assert_eq!(
            m.tensors["model.embed_tokens.weight"].dims(),
            &[e["vocab_size"].as_u64().unwrap() as usize, 64]
        );
        let mut differ = Vec::new();
        for case in e["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let cpp = ids(&case["cpp_special"]);
            let plain = tok.encode(text, false).unwrap();
            assert_eq!(
                plain, cpp,
                "encode {text:?} (no special tokens) vs llama.cpp"
            );
            let mut with_bos = vec![1];
            with_bos.extend(&cpp);
            assert_eq!(
                tok.encode(text, true).unwrap(),
                with_bos,
                "encode {text:?} (with bos) vs llama.cpp"
            );
            if plain != ids(&case["hf_plain"]) {
                differ.push(text);
            }
            // Without special markup, SentencePiece itself gives the same ids, and decoding gives the text.
            if ids(&case["cpp"]) == cpp && ids(&case["sp"]) == cpp {
                assert_eq!(
                    tok.decode(&plain, true).unwrap(),
                    case["sp_decode"].as_str().unwrap(),
                    "round trip {text:?}"
                );
            }
            // Decoding follows transformers.
            let hf = ids(&case["hf"]);
            assert_eq!(
                tok.decode(&hf, false).unwrap(),
                case["hf_decode"].as_str().unwrap(),
                "decode {hf:?}"
            );
            assert_eq!(
                tok.decode(&hf, true).unwrap(),
                case["hf_decode_skip"].as_str().unwrap(),
                "decode {hf:?}, skipping special tokens"
            );
        }
        let mut known = DIFFERENT_FROM_TRANSFORMERS.to_vec();
        known.sort();
        differ.sort();
        assert_eq!(differ, known);
    }

    #[test]
    fn spm_gguf_special_tokens_and_chat_template() {
        let e = expected();
        let tok = Tokenizer::from_gguf_metadata(&metadata()).unwrap();
        for (t, id) in e["token_ids"].as_object().unwrap() {
            assert_eq!(tok.token_to_id(t), Some(id.as_u64().unwrap() as u32), "{t}");
        }
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_id(), Some(2));
        assert_eq!(ids(&e["cpp_bos_eos"]), vec![1, 2]);
        assert_eq!(tok.bos_token(), Some("<s>"));
        assert_eq!(tok.eos_token(), Some("</s>"));
        // No `unknown_token_id` in the file: llama.cpp's default 0 (transformers has none).
        assert!(e["unk_token_id"].is_null());
        assert_eq!(tok.unk_token_id(), Some(0));
        assert_eq!(tok.pad_token_id(), None);
        let specials: Vec<String> = tok.special_tokens().into_iter().map(|(t, _)| t).collect();
        assert_eq!(
            specials,
            ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
        );
        assert_eq!(tok.tokenizer_config()["add_bos_token"], json!(true));
        assert_eq!(tok.tokenizer_config()["add_eos_token"], json!(false));

        let msgs: Vec<ChatMessage> = serde_json::from_value(e["chat_messages"].clone()).unwrap();
        let chat = tok.apply_chat_template(&msgs, false).unwrap();
        assert_eq!(chat, e["chat_text"].as_str().unwrap());
        let got = tok.encode(&chat, false).unwrap();
        assert_eq!(got, ids(&e["chat_ids_cpp"]));
        // transformers: no "▁" between <s> / </s> and "[INST]".
        assert_ne!(got, ids(&e["chat_ids"]));
    }

    #[test]
    fn spm_gguf_without_space_prefix_matches_llama_cpp() {
        let e = expected();
        let mut md = metadata();
        md.insert(
            "tokenizer.ggml.add_space_prefix".into(),
            GgufValue::Bool(false),
        );
        let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
        for case in e["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text, false).unwrap(),
                ids(&case["cpp_nospace_special"]),
                "encode {text:?} without space prefix"
            );
            // Nothing is stripped when decoding, as in llama.cpp.
            assert_eq!(
                tok.decode(&ids(&case["hf"]), true).unwrap(),
                case["cpp_nospace_decode"].as_str().unwrap(),
                "decode {text:?} without space prefix"
            );
        }
    }

    #[test]
    fn merges_from_scores_match_transformers() {
        let e = expected();
        let md = metadata();
        let list = |k: &str| match &md[k] {
            GgufValue::Array(a) => a.clone(),
            _ => panic!(),
        };
        let tokens: Vec<String> = list("tokenizer.ggml.tokens")
            .into_iter()
            .map(|v| v.to_string().unwrap().clone())
            .collect();
        let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let scores: Vec<f32> = list("tokenizer.ggml.scores")
            .into_iter()
            .map(|v| v.to_f32().unwrap())
            .collect();
        let merges: Vec<String> = merges_from_scores(&tokens, &scores)
            .into_iter()
            .map(|(a, b)| format!("{a} {b}"))
            .collect();
        let want = &e["hf_merges"];
        assert_eq!(merges.len() as u64, want["count"].as_u64().unwrap());
        let head: Vec<String> = serde_json::from_value(want["head"].clone()).unwrap();
        assert_eq!(merges[..head.len()], head[..]);
        let mut h: u64 = 0xCBF2_9CE4_8422_2325;
        for b in merges.join("\n").bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01B3);
        }
        assert_eq!(format!("{h:016x}"), want["fnv1a64"].as_str().unwrap());
    }

    #[test]
    fn spm_defaults_round_trip_and_streaming() {
        // Without the id / flag keys: llama.cpp's defaults bos 1, eos 2, add_bos true.
        let mut md = metadata();
        for k in [
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token",
            "tokenizer.ggml.add_eos_token",
        ] {
            md.remove(k);
        }
        let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_id(), Some(2));
        assert_eq!(tok.encode("", true).unwrap(), vec![1]);
        md.insert("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(true));
        md.insert(
            "tokenizer.ggml.add_bos_token".into(),
            GgufValue::Bool(false),
        );
        let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
        assert_eq!(tok.encode("", true).unwrap(), vec![2]);

        // tokenizer.json + tokenizer_config.json written and read back encode the same.
        let tok = Tokenizer::from_gguf_metadata(&metadata()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        tok.save_dir(dir.path()).unwrap();
        let back = Tokenizer::from_file(
            dir.path().join("tokenizer.json"),
            Some(&dir.path().join("tokenizer_config.json")),
        )
        .unwrap();
        for case in expected()["cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                back.encode(text, true).unwrap(),
                tok.encode(text, true).unwrap()
            );
        }
        assert_eq!(back.unk_token(), Some("<unk>"));

        // Streaming: byte-fallback pieces of an emoji come out once the character is complete.
        let ids = tok.encode("emoji 🙂👍 ok", false).unwrap();
        let mut s = tok.stream_decoder(true);
        let mut text = String::new();
        for &i in &ids {
            if let Some(piece) = s.step(i).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "{piece:?}");
                text.push_str(&piece);
            }
        }
        if let Some(rest) = s.finish().unwrap() {
            text.push_str(&rest);
        }
        assert_eq!(text, "emoji 🙂👍 ok");
    }

    #[test]
    fn spm_needs_scores_or_merges() {
        let mut md = metadata();
        md.remove("tokenizer.ggml.scores");
        let err = Tokenizer::from_gguf_metadata(&md).unwrap_err();
        assert!(err.to_string().contains("tokenizer.ggml.scores"), "{err}");
    }

    /// llama.cpp's own tokenizer test on the real Llama 2 vocabulary (opt-in): `PEFT_LLAMA_SPM_VOCAB` names
    /// `ggml-vocab-llama-spm.gguf` with its `.inp` / `.out` beside it, from llama.cpp's `models/` folder (for
    /// example inside the sdist of `llama-cpp-python==0.3.36`, `vendor/llama.cpp/models/`). The `.out` ids
    /// come from the HF tokenizer of Llama 2, and llama.cpp's test-tokenizer-0 checks itself against them
    /// (add_special and parse_special off).
    #[test]
    fn llama_cpp_vocab_test_llama_spm() {
        let Ok(path) = std::env::var("PEFT_LLAMA_SPM_VOCAB") else {
            eprintln!("PEFT_LLAMA_SPM_VOCAB not set: skipped");
            return;
        };
        let mut f = std::fs::File::open(&path).unwrap();
        let md = gguf_file::Content::read(&mut f).unwrap().metadata;
        let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
        let inp = std::fs::read_to_string(format!("{path}.inp")).unwrap();
        let out = std::fs::read_to_string(format!("{path}.out")).unwrap();
        let texts: Vec<&str> = inp
            .strip_suffix("\n__ggml_vocab_test__\n")
            .unwrap_or(&inp)
            .split("\n__ggml_vocab_test__\n")
            .collect();
        let want: Vec<&str> = out.lines().collect();
        assert_eq!(texts.len(), want.len());
        let mut bad = 0;
        for (text, line) in texts.iter().zip(&want) {
            let want: Vec<u32> = line
                .split_whitespace()
                .map(|x| x.parse().unwrap())
                .collect();
            let got = tok.encode(text, false).unwrap();
            if got != want {
                bad += 1;
                eprintln!("{text:?}: got {got:?}, want {want:?}");
            }
        }
        assert_eq!(bad, 0, "{bad} of {} texts differ", texts.len());
        // More texts, if given: `PEFT_LLAMA_SPM_EXTRA` names a JSON {"texts": [...], "ids": [[...], ...]} of
        // llama.cpp's ids for this vocabulary (llama_tokenize, add_special off, parse_special on), as
        // `fixtures/spm_tokenizer/gen_spm.py --llama-spm-extra <vocab.gguf> <out.json>` writes it (3,781 texts).
        if let Ok(extra) = std::env::var("PEFT_LLAMA_SPM_EXTRA") {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(extra).unwrap()).unwrap();
            let texts = v["texts"].as_array().unwrap();
            let want = v["ids"].as_array().unwrap();
            assert_eq!(texts.len(), want.len());
            let bad = texts
                .iter()
                .zip(want)
                .filter(|(t, w)| {
                    let t = t.as_str().unwrap();
                    let got = tok.encode(t, false).unwrap();
                    let ok = got == ids(w);
                    if !ok {
                        eprintln!("{t:?}: got {got:?}, want {w}");
                    }
                    !ok
                })
                .count();
            assert_eq!(bad, 0, "{bad} of {} extra texts differ", texts.len());
            eprintln!("{} extra texts match llama.cpp", texts.len());
        }
    }
}
