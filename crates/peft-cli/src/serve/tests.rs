//! `peft serve` over real HTTP (reqwest) on a tiny random Llama with a word-level tokenizer and LoRA adapters
//! from the fixtures: outputs against `peft generate`, streaming against non-streaming, concurrent mixed
//! batches against sequential requests, load / unload while requests run, errors, queue limits, shutdown.

use super::{Server, ServerConfig};
use crate::{Cli, run_with};
use candle_core::{DType, Device};
use clap::Parser;
use peft_models::llama::{LlamaConfig, LlamaForCausalLM};
use peft_models::tokenizer::Tokenizer;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + \
                      message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt \
                      %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
const SPECIAL: [&str; 5] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"];
const WORDS: [&str; 19] = [
    "hello",
    "world",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "user",
    "assistant",
    "hi",
    "there",
    "how",
    "are",
    "you",
    "fine",
    "thanks",
    ".",
    "?",
    ",",
];

fn lora_case(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/lora/cases")
        .join(case)
}

/// The adapters: `a` (LoRA on q, v), `b` (v, o, down), and `c` (every linear), which tests load at runtime.
fn adapter_dir(name: &str) -> PathBuf {
    match name {
        "a" => lora_case("llama_two_adapters").join("adapter"),
        "b" => lora_case("llama_two_adapters").join("adapter/other"),
        _ => lora_case("llama_all_linear").join("adapter"),
    }
}

/// A word-level tokenizer (`<s>`, `</s>`, ChatML) and a 2-layer Llama with the fixtures' LoRA shapes
/// (hidden 32, 4 heads, 2 KV heads, MLP 64), random weights, context 64, written as an HF directory.
fn write_model(dir: &Path) -> PathBuf {
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
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    let staging = dir.join("staging-tokenizer.json");
    std::fs::write(&staging, tj.to_string()).unwrap();
    let mut tok = Tokenizer::from_file(&staging, None).unwrap();
    tok.set_bos_token(Some("<s>")).unwrap();
    tok.set_eos_token(Some("</s>")).unwrap();
    tok.set_chat_template(Some(CHATML.to_string()));
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": tok.vocab_size(), "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2,
    });
    let llama = LlamaConfig::from_value(&config).unwrap();
    let tensors = LlamaForCausalLM::random_tensors(&llama, 7, DType::F32, &Device::Cpu).unwrap();
    let model = dir.join("tiny");
    peft_models::export::write_hf_dir(&model, &config, &tensors, Some(&tok)).unwrap();
    model
}

/// A server on 127.0.0.1:0 with adapters `a` and `b`, driven from a runtime of its own.
struct TestServer {
    _tmp: tempfile::TempDir,
    model: PathBuf,
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

fn start(tweak: impl FnOnce(&mut ServerConfig)) -> TestServer {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(tmp.path());
    let loaded = peft_models::load_model(&model, &Device::Cpu).unwrap();
    let mut config = ServerConfig::new("tiny");
    tweak(&mut config);
    let adapters = [
        ("a".to_string(), adapter_dir("a")),
        ("b".to_string(), adapter_dir("b")),
    ];
    let server = Server::start(loaded.model, loaded.tokenizer.unwrap(), &adapters, config).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = rt.spawn(server.serve(listener, async {
        let _ = stopped.await;
    }));
    TestServer {
        _tmp: tmp,
        model,
        rt,
        addr,
        client: reqwest::Client::new(),
        stop: Some(stop),
        done: Some(done),
    }
}

/// What a response came back with.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

async fn send(
    client: &reqwest::Client,
    addr: SocketAddr,
    path: &str,
    body: Option<String>,
) -> Reply {
    let url = format!("http://{addr}{path}");
    let req = match body {
        Some(b) => client
            .post(url)
            .header("content-type", "application/json")
            .body(b),
        None => client.get(url),
    };
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    Reply {
        status,
        body: resp.text().await.unwrap(),
    }
}

/// The `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        })
        .map(|s| s.to_string())
        .collect()
}

/// The text, finish reason and usage (if sent) of a streamed answer; checks the `[DONE]` ending.
fn stream_text(body: &str, chat: bool) -> (String, String, Option<Value>) {
    let data = sse_data(body);
    assert_eq!(data.last().map(|s| s.as_str()), Some("[DONE]"), "{body}");
    let mut text = String::new();
    let mut finish = String::new();
    let mut usage = None;
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        assert!(v.get("error").is_none(), "{d}");
        if let Some(u) = v.get("usage") {
            usage = Some(u.clone());
        }
        let Some(c) = v["choices"].get(0) else {
            continue;
        };
        let piece = if chat {
            c["delta"]["content"].as_str()
        } else {
            c["text"].as_str()
        };
        text.push_str(piece.unwrap_or(""));
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, finish, usage)
}

impl TestServer {
    fn post(&self, path: &str, body: Value) -> Reply {
        self.rt
            .block_on(send(&self.client, self.addr, path, Some(body.to_string())))
    }

    fn post_raw(&self, path: &str, body: &str) -> Reply {
        self.rt
            .block_on(send(&self.client, self.addr, path, Some(body.to_string())))
    }

    fn get(&self, path: &str) -> Reply {
        self.rt.block_on(send(&self.client, self.addr, path, None))
    }

    /// A greedy completion's text (non-streaming), checked to be a 200.
    fn complete(&self, model: &str, prompt: &str, max_tokens: usize) -> String {
        let r = self.post(
            "/v1/completions",
            json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0]["text"].as_str().unwrap().to_string()
    }

    fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            self.rt.block_on(d).unwrap().unwrap();
        }
    }
}

/// `peft generate` itself (the CLI, in process), its output without the final newline.
fn peft_generate(model: &Path, adapter: Option<&str>, prompt: &str, extra: &[&str]) -> String {
    let mut args: Vec<String> = vec!["peft".into(), "generate".into(), "--model".into()];
    args.push(model.display().to_string());
    if let Some(a) = adapter {
        args.push("--adapter".into());
        args.push(adapter_dir(a).display().to_string());
    }
    args.extend(["--prompt".to_string(), prompt.to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut out = Vec::new();
    run_with(Cli::try_parse_from(&args).unwrap(), &mut out).unwrap();
    let s = String::from_utf8(out).unwrap();
    s.strip_suffix('\n').unwrap_or(&s).to_string()
}

/// Per adapter (and the base): greedy completions equal `peft generate` with that adapter and prompt,
/// streamed or not; chat equals `peft generate --chat`; a seeded sampled completion equals `peft generate
/// --temperature … --seed …`; the usage counts the prompt's tokens.
#[test]
fn serve_matches_peft_generate_per_adapter_streaming_or_not() {
    let s = start(|_| {});
    let prompt = "the cat sat on";
    let mut texts = Vec::new();
    for (model, adapter) in [("tiny", None), ("a", Some("a")), ("b", Some("b"))] {
        let want = peft_generate(&s.model, adapter, prompt, &["--max-new-tokens", "12"]);
        let r = s.post(
            "/v1/completions",
            json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["choices"][0]["text"], want.as_str(), "{model}");
        assert_eq!(v["object"], "text_completion");
        assert_eq!(v["model"], model);
        // Four words (the tokenizer has no post-processor adding `<s>`).
        assert_eq!(v["usage"]["prompt_tokens"], 4, "{v}");
        let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
        assert!(completion <= 12);
        let finish = v["choices"][0]["finish_reason"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(finish == "length", completion == 12, "{v}");

        let r = s.post(
            "/v1/completions",
            json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": true,
                   "stream_options": {"include_usage": true}}),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let (text, f, usage) = stream_text(&r.body, false);
        assert_eq!(text, want, "{model} streamed");
        assert_eq!(f, finish);
        assert_eq!(usage.unwrap()["completion_tokens"], completion);

        let want_chat = peft_generate(
            &s.model,
            adapter,
            "hello world",
            &["--chat", "--max-new-tokens", "10"],
        );
        let body = json!({"model": model, "messages": [{"role": "user", "content": "hello world"}],
                          "max_tokens": 10, "temperature": 0});
        let r = s.post("/v1/chat/completions", body.clone());
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            want_chat.as_str(),
            "{model} chat"
        );
        let mut body = body;
        body["stream"] = json!(true);
        let r = s.post("/v1/chat/completions", body);
        let (text, _, _) = stream_text(&r.body, true);
        assert_eq!(text, want_chat, "{model} chat streamed");

        let want_sampled = peft_generate(
            &s.model,
            adapter,
            prompt,
            &[
                "--max-new-tokens",
                "12",
                "--temperature",
                "0.9",
                "--seed",
                "11",
            ],
        );
        let r = s.post(
            "/v1/completions",
            json!({"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0.9, "seed": 11}),
        );
        assert_eq!(
            r.json()["choices"][0]["text"],
            want_sampled.as_str(),
            "{model} sampled"
        );
        texts.push((want, want_sampled));
    }
    // The adapters change the outputs (else the comparisons above would not tell them apart).
    assert!(
        texts[0] != texts[1] && texts[1] != texts[2] && texts[0] != texts[2],
        "{texts:?}"
    );
    s.shutdown();
}

/// Twelve requests at once over three models and three prompts (mixed batches of up to 8 rows, rows
/// joining and leaving) give the texts the same requests give one at a time.
#[test]
fn serve_concurrent_mixed_adapter_batches_equal_sequential_requests() {
    let s = start(|c| c.max_batch = 8);
    let prompts = [
        "the cat sat on",
        "hello world , how",
        "hi there",
        "how are you ?",
    ];
    let models = ["a", "tiny", "b"];
    let mut jobs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        for (j, m) in models.iter().enumerate() {
            jobs.push((m.to_string(), p.to_string(), 6 + 3 * ((i + j) % 3)));
        }
    }
    let sequential: Vec<String> = jobs.iter().map(|(m, p, n)| s.complete(m, p, *n)).collect();
    let concurrent: Vec<String> = s.rt.block_on(async {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(m, p, n)| {
                let (client, addr) = (s.client.clone(), s.addr);
                let body = json!({"model": m, "prompt": p, "max_tokens": n, "temperature": 0,
                                  "stream": (n % 2 == 0)});
                tokio::spawn(async move {
                    let r = send(&client, addr, "/v1/completions", Some(body.to_string())).await;
                    assert_eq!(r.status, 200, "{}", r.body);
                    if r.body.starts_with("data:") {
                        stream_text(&r.body, false).0
                    } else {
                        r.json()["choices"][0]["text"].as_str().unwrap().to_string()
                    }
                })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    });
    assert_eq!(concurrent, sequential);
    s.shutdown();
}

/// Load and unload adapters while a streamed request runs (decode steps slowed to keep it in flight): the
/// stream completes with the same text as alone; the loaded adapter is listed with its parent, serves,
/// and after unloading is gone (404). Unloading the adapter the stream itself uses lets the stream finish,
/// refuses new requests for it, and a reload waits for the stream (409) then succeeds.
#[test]
fn serve_load_and_unload_while_requests_stream() {
    let s = start(|c| c.step_delay = Some(Duration::from_millis(15)));
    let body = json!({"model": "a", "prompt": "hello world", "max_tokens": 30, "temperature": 0,
                      "ignore_eos": true});
    let alone = s.post("/v1/completions", body.clone()).json()["choices"][0]["text"]
        .as_str()
        .unwrap()
        .to_string();
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);

    let (client, addr) = (s.client.clone(), s.addr);
    let c_dir = adapter_dir("c").display().to_string();
    s.rt.block_on(async {
        let url = format!("http://{addr}/v1/completions");
        let mut resp = client
            .post(&url)
            .body(stream_body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let mut seen = String::from_utf8(resp.chunk().await.unwrap().unwrap().to_vec()).unwrap();

        let load = json!({"lora_name": "c", "lora_path": c_dir}).to_string();
        let r = send(&client, addr, "/v1/load_lora_adapter", Some(load.clone())).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let models: Value =
            serde_json::from_str(&send(&client, addr, "/v1/models", None).await.body).unwrap();
        let ids: Vec<(&str, &Value)> = models["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| (m["id"].as_str().unwrap(), &m["parent"]))
            .collect();
        assert_eq!(
            ids,
            [
                ("tiny", &Value::Null),
                ("a", &json!("tiny")),
                ("b", &json!("tiny")),
                ("c", &json!("tiny"))
            ]
        );
        let one = json!({"model": "c", "prompt": "the cat", "max_tokens": 3, "temperature": 0})
            .to_string();
        let r = send(&client, addr, "/v1/completions", Some(one.clone())).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let r = send(
            &client,
            addr,
            "/v1/unload_lora_adapter",
            Some(json!({"lora_name": "c"}).to_string()),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let r = send(&client, addr, "/v1/completions", Some(one)).await;
        assert_eq!(r.status, 404, "{}", r.body);

        // Unload the stream's own adapter while it runs.
        let r = send(
            &client,
            addr,
            "/v1/unload_lora_adapter",
            Some(json!({"lora_name": "a"}).to_string()),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        let again = json!({"model": "a", "prompt": "hi", "max_tokens": 2}).to_string();
        let r = send(&client, addr, "/v1/completions", Some(again)).await;
        assert_eq!(r.status, 404, "{}", r.body);
        let reload = json!({"lora_name": "a", "lora_path": adapter_dir("a").display().to_string()})
            .to_string();
        let r = send(&client, addr, "/v1/load_lora_adapter", Some(reload.clone())).await;
        assert_eq!(r.status, 409, "{}", r.body);
        assert!(
            !seen.contains("[DONE]"),
            "the stream ended before the loads: {seen}"
        );

        while let Some(c) = resp.chunk().await.unwrap() {
            seen.push_str(std::str::from_utf8(&c).unwrap());
        }
        let (text, finish, _) = stream_text(&seen, false);
        assert_eq!(text, alone);
        assert_eq!(finish, "length");
        let r = send(&client, addr, "/v1/load_lora_adapter", Some(reload)).await;
        assert_eq!(r.status, 200, "{}", r.body);
    });
    // The reloaded adapter serves as before.
    assert_eq!(
        s.post("/v1/completions", body).json()["choices"][0]["text"],
        alone.as_str()
    );
    s.shutdown();
}

/// Bad requests get OpenAI-style JSON errors with 4xx statuses, never a crash; the server still serves.
#[test]
fn serve_answers_bad_requests_with_openai_errors() {
    let s = start(|c| c.max_prompt_tokens = Some(20));
    let err = |r: &Reply, status: u16| -> Value {
        assert_eq!(r.status, status, "{}", r.body);
        let v = r.json();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert!(v["error"]["type"].is_string(), "{v}");
        v["error"].clone()
    };
    let e = err(
        &s.post_raw("/v1/completions", "{\"model\": \"tiny\", "),
        400,
    );
    assert_eq!(e["type"], "invalid_request_error");
    err(&s.post_raw("/v1/chat/completions", "not json"), 400);
    let e = err(
        &s.post("/v1/completions", json!({"model": "nope", "prompt": "hi"})),
        404,
    );
    assert_eq!(e["code"], "model_not_found");
    assert_eq!(e["param"], "model");
    let e = err(
        &s.post(
            "/v1/chat/completions",
            json!({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}),
        ),
        404,
    );
    assert_eq!(e["code"], "model_not_found");
    // 25 words: over --max-prompt-tokens 20.
    let long = vec!["cat"; 25].join(" ");
    let e = err(
        &s.post("/v1/completions", json!({"model": "a", "prompt": long})),
        400,
    );
    assert_eq!(e["code"], "context_length_exceeded");
    // Prompt + max_tokens over the context (64).
    let e = err(
        &s.post(
            "/v1/completions",
            json!({"model": "a", "prompt": "hi", "max_tokens": 100}),
        ),
        400,
    );
    assert_eq!(e["code"], "context_length_exceeded");
    err(&s.post("/v1/completions", json!({"model": "a"})), 400);
    err(&s.post("/v1/completions", json!({"prompt": "hi"})), 400);
    err(
        &s.post(
            "/v1/completions",
            json!({"model": "a", "prompt": "hi", "n": 2}),
        ),
        400,
    );
    err(
        &s.post(
            "/v1/completions",
            json!({"model": "a", "prompt": "hi", "temperature": "hot"}),
        ),
        400,
    );
    err(
        &s.post(
            "/v1/completions",
            json!({"model": "a", "prompt": "hi", "top_p": 0}),
        ),
        400,
    );
    err(
        &s.post(
            "/v1/completions",
            json!({"model": "a", "prompt": [1, 2, 999]}),
        ),
        400,
    );
    err(
        &s.post(
            "/v1/chat/completions",
            json!({"model": "a", "messages": []}),
        ),
        400,
    );
    err(&s.get("/v1/nothing"), 404);
    err(&s.get("/v1/completions"), 405);
    let missing = json!({"lora_name": "x", "lora_path": "/no/such/adapter"});
    err(&s.post("/v1/load_lora_adapter", missing), 400);
    let dup = json!({"lora_name": "b", "lora_path": adapter_dir("b").display().to_string()});
    err(&s.post("/v1/load_lora_adapter", dup), 400);
    let base = json!({"lora_name": "tiny", "lora_path": adapter_dir("c").display().to_string()});
    err(&s.post("/v1/load_lora_adapter", base), 400);
    err(
        &s.post("/v1/load_lora_adapter", json!({"lora_name": "x"})),
        400,
    );
    err(
        &s.post("/v1/unload_lora_adapter", json!({"lora_name": "zzz"})),
        404,
    );
    // DoRA takes part in mixed batches (PEFT refuses it there): it loads, serves, unloads.
    let dora = json!({"lora_name": "d", "lora_path": lora_case("llama_dora").join("adapter").display().to_string()});
    let r = s.post("/v1/load_lora_adapter", dora);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!s.complete("d", "w1 w2", 3).is_empty());
    let r = s.post("/v1/unload_lora_adapter", json!({"lora_name": "d"}));
    assert_eq!(r.status, 200, "{}", r.body);
    // A prompt-learning adapter cannot join a mixed batch of layer adapters: refused at load.
    let prompt = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/prompt/cases/prompt_tuning_random/adapter");
    let e = err(
        &s.post(
            "/v1/load_lora_adapter",
            json!({"lora_name": "p", "lora_path": prompt.display().to_string()}),
        ),
        400,
    );
    assert_eq!(e["param"], "lora_path", "{e}");
    // Still serving, and /health and /v1/models answer.
    assert_eq!(s.get("/health").status, 200);
    let v = s.get("/v1/models").json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny", "a", "b"]);
    assert_eq!(v["data"][1]["parent"], "tiny");
    assert_eq!(v["data"][0]["max_model_len"], 64);
    s.shutdown();
}

/// With one running and one waiting place, a burst of requests gets 429s (OpenAI's rate-limit error) for
/// the overflow and 200s for the rest; a stop signal lets the streams in flight finish, then the server ends.
#[test]
fn serve_bounds_its_queue_and_shuts_down_gracefully() {
    let s = start(|c| {
        c.max_batch = 1;
        c.max_queue = 1;
        c.step_delay = Some(Duration::from_millis(10));
    });
    let statuses: Vec<(u16, Value)> = s.rt.block_on(async {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let (client, addr) = (s.client.clone(), s.addr);
                let body = json!({"model": "b", "prompt": "hi there", "max_tokens": 8, "temperature": 0,
                                  "ignore_eos": true});
                tokio::spawn(async move {
                    let r = send(&client, addr, "/v1/completions", Some(body.to_string())).await;
                    (r.status, r.json())
                })
            })
            .collect();
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    });
    let busy: Vec<&Value> = statuses
        .iter()
        .filter(|(st, _)| *st == 429)
        .map(|(_, v)| v)
        .collect();
    let ok = statuses.iter().filter(|(st, _)| *st == 200).count();
    assert!(
        !busy.is_empty() && ok >= 2 && busy.len() + ok == 6,
        "{statuses:?}"
    );
    assert_eq!(busy[0]["error"]["type"], "rate_limit_error");

    // Graceful shutdown: a stream in flight completes.
    let mut s = s;
    let (client, addr) = (s.client.clone(), s.addr);
    let stop = s.stop.take().unwrap();
    let body = json!({"model": "a", "prompt": "the cat", "max_tokens": 20, "temperature": 0,
                      "ignore_eos": true, "stream": true});
    let text = s.rt.block_on(async move {
        let mut resp = client
            .post(format!("http://{addr}/v1/completions"))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let mut seen = String::from_utf8(resp.chunk().await.unwrap().unwrap().to_vec()).unwrap();
        stop.send(()).unwrap();
        while let Some(c) = resp.chunk().await.unwrap() {
            seen.push_str(std::str::from_utf8(&c).unwrap());
        }
        seen
    });
    let (_, finish, _) = stream_text(&text, false);
    assert_eq!(finish, "length");
    let done = s.done.take().unwrap();
    s.rt.block_on(done).unwrap().unwrap();
    // Nothing listens any more.
    let refused = s.rt.block_on(async {
        reqwest::Client::new()
            .get(format!("http://{}/health", s.addr))
            .send()
            .await
            .is_err()
    });
    assert!(refused);
}

#[test]
fn adapter_args_parse() {
    let (n, d) = super::parse_adapter_arg("x=/a/b=c").unwrap();
    assert_eq!((n.as_str(), d), ("x", PathBuf::from("/a/b=c")));
    assert!(super::parse_adapter_arg("x").is_err());
    assert!(super::parse_adapter_arg("=d").is_err());
    let cli = Cli::try_parse_from([
        "peft",
        "serve",
        "--model",
        "m",
        "--adapter",
        "a=d1",
        "--adapter",
        "b=d2",
        "--port",
        "0",
    ])
    .unwrap();
    assert!(
        matches!(cli.command, crate::Command::Serve(ref a) if a.adapter.len() == 2 && a.port == 0)
    );
}
