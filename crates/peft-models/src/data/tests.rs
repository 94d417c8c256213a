//! Tests of the data pipeline, with a tiny word-level tokenizer built in code (no network).

use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor, Var};

use super::*;

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

/// A word-level tokenizer: ids 0..5 are `<unk> <s> </s> <|im_start|> <|im_end|>`, then [`WORDS`] in order;
/// whitespace separates words (and is dropped), punctuation is its own token.
pub(crate) fn tiny_tokenizer(chat_template: &str) -> Tokenizer {
    let mut vocab = serde_json::Map::new();
    for (i, w) in SPECIAL.iter().chain(WORDS.iter()).enumerate() {
        vocab.insert(w.to_string(), serde_json::json!(i));
    }
    let added: Vec<serde_json::Value> = SPECIAL
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    let inner = tokenizers::Tokenizer::from_str(&json.to_string()).unwrap();
    let mut tok = Tokenizer::new(inner);
    tok.set_eos_token(Some("</s>")).unwrap();
    tok.set_bos_token(Some("<s>")).unwrap();
    tok.set_chat_template(Some(chat_template.to_string()));
    tok
}

fn id(w: &str) -> u32 {
    SPECIAL
        .iter()
        .chain(WORDS.iter())
        .position(|x| *x == w)
        .unwrap_or_else(|| panic!("{w} not in the test vocabulary")) as u32
}

fn ids(text: &str) -> Vec<u32> {
    text.split_whitespace().map(id).collect()
}

fn labels_of(text: &str) -> Vec<i64> {
    ids(text).into_iter().map(i64::from).collect()
}

const EOS: u32 = 2;
const IGN: i64 = IGNORE_INDEX;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load(path: &Path, seq_len: usize) -> Result<Dataset> {
    load_dataset(path, &tiny_tokenizer(CHATML), &DataConfig::new(seq_len))
}

fn err_of(r: Result<Dataset>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn text_files_are_packed_with_eos_between_documents() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "b.txt", "the cat sat");
    write(dir.path(), "a.md", "hello world");
    write(dir.path(), ".hidden.txt", "hi");
    write(dir.path(), "notes.bin", "hi");
    // Directory: files sorted by name (a.md, b.txt), each followed by EOS, windows of 4, labels = inputs.
    let ds = load(dir.path(), 4).unwrap();
    assert_eq!(ds.kind, ExampleKind::Text);
    let stream: Vec<u32> = [ids("hello world"), vec![EOS], ids("the cat sat"), vec![EOS]].concat();
    assert_eq!(ds.examples.len(), 2);
    assert_eq!(ds.examples[0].input_ids, stream[..4]);
    assert_eq!(ds.examples[1].input_ids, stream[4..]);
    for e in &ds.examples {
        let inputs: Vec<i64> = e.input_ids.iter().map(|&t| i64::from(t)).collect();
        assert_eq!(e.labels, inputs);
    }
    // A trailing window of a single token predicts nothing and is dropped.
    let ds = load(dir.path(), 3).unwrap();
    assert_eq!(ds.examples.len(), 2);
    assert_eq!(ds.n_tokens(), 6);
    // One file = one document.
    let one = load(&dir.path().join("b.txt"), 16).unwrap();
    assert_eq!(
        one.examples,
        vec![Example::lm([ids("the cat sat"), vec![EOS]].concat())]
    );
}

#[test]
fn jsonl_text_lines_are_packed_like_documents() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "d.jsonl",
        "{\"text\": \"hello world\", \"id\": 1}\n{\"text\": \"hi there\"}\n",
    );
    let ds = load(&p, 3).unwrap();
    assert_eq!(ds.kind, ExampleKind::Text);
    let got: Vec<u32> = ds
        .examples
        .iter()
        .flat_map(|e| e.input_ids.clone())
        .collect();
    assert_eq!(
        got,
        [ids("hello world"), vec![EOS], ids("hi there"), vec![EOS]].concat()
    );
    assert_eq!(ds.examples.len(), 2);
}

#[test]
fn prompt_completion_counts_only_the_completion_and_eos() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "pc.jsonl",
        "{\"prompt\": \"how are you ?\", \"completion\": \"fine , thanks\"}\n\
         {\"prompt\": \"hello hello hello hello hello hello\", \"completion\": \"hi\"}\n",
    );
    let ds = load(&p, 8).unwrap();
    assert_eq!(ds.kind, ExampleKind::PromptCompletion);
    // The second line's prompt fills the 8-token window but the completion still fits: kept.
    assert_eq!(ds.len(), 2);
    let e = &ds.examples[0];
    assert_eq!(
        e.input_ids,
        [ids("how are you ? fine , thanks"), vec![EOS]].concat()
    );
    assert_eq!(
        e.labels,
        [vec![IGN; 4], labels_of("fine , thanks"), vec![2]].concat()
    );
    assert_eq!(e.n_targets(), 4);
    // Truncated to seq_len, keeping the start; a line whose completion is cut off entirely is skipped.
    let ds = load(&p, 5).unwrap();
    assert_eq!(ds.len(), 1);
    assert_eq!(ds.skipped, 1);
    assert_eq!(ds.examples[0].input_ids, ids("how are you ? fine"));
    assert_eq!(
        ds.examples[0].labels,
        [vec![IGN; 4], labels_of("fine")].concat()
    );
}

#[test]
fn chat_masks_everything_but_the_assistant_turns() {
    let dir = tempfile::tempdir().unwrap();
    let line = serde_json::json!({"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "how are you ?"},
        {"role": "assistant", "content": "fine , thanks !"},
    ]});
    let p = write(dir.path(), "chat.jsonl", &format!("{line}\n"));
    let ds = load(&p, 64).unwrap();
    assert_eq!(ds.kind, ExampleKind::Chat);
    let s = id("<|im_start|>");
    let e = id("<|im_end|>");
    let turn = |role: &str, text: &str| [vec![s, id(role)], ids(text), vec![e]].concat();
    let expect_ids = [
        turn("system", "be brief"),
        turn("user", "hello"),
        turn("assistant", "hi there"),
        turn("user", "how are you ?"),
        turn("assistant", "fine , thanks !"),
    ]
    .concat();
    let ex = &ds.examples[0];
    assert_eq!(ex.input_ids, expect_ids);
    // Masked: everything up to and including "<|im_start|> assistant"; counted: the answer and <|im_end|>.
    let masked = |n: usize| vec![IGN; n];
    let answer = |text: &str| [labels_of(text), vec![i64::from(e)]].concat();
    let expect_labels = [
        masked(5 + 4 + 2),
        answer("hi there"),
        masked(7 + 2),
        answer("fine , thanks !"),
    ]
    .concat();
    assert_eq!(ex.labels, expect_labels);
    assert_eq!(ex.n_targets(), 3 + 5);
}

#[test]
fn chat_with_unstable_prefix_is_an_error() {
    // The generation prompt says "bot" but the rendered assistant turn says "assistant".
    let template = CHATML.replace("'<|im_start|>assistant\\n'", "'<|im_start|>bot\\n'");
    let tok = tiny_tokenizer(&template);
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "chat.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hello\"}]}\n",
    );
    let msg = load_dataset(&p, &tok, &DataConfig::new(32))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("line 1"), "{msg}");
    assert!(msg.contains("not stable"), "{msg}");
    assert!(msg.contains("chat.jsonl"), "{msg}");
}

#[test]
fn input_ids_pass_through_with_or_without_labels() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(
        dir.path(),
        "tok.jsonl",
        "{\"input_ids\": [5, 6, 7, 8]}\n{\"input_ids\": [9, 10, 11], \"labels\": [-100, 10, 11]}\n",
    );
    let ds = load(&p, 3).unwrap();
    assert_eq!(ds.kind, ExampleKind::Tokens);
    assert_eq!(ds.examples[0], Example::lm(vec![5, 6, 7]));
    assert_eq!(
        ds.examples[1],
        Example {
            input_ids: vec![9, 10, 11],
            labels: vec![-100, 10, 11]
        }
    );
}

#[test]
fn bad_lines_are_errors_with_their_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &str); 10] = [
        (
            "{\"text\": \"hi\"}\n{\"text\": \"hi\"}\n{\"text\": \"hi\"\n",
            "line 3",
            "invalid JSON",
        ),
        (
            "{\"text\": \"hi\"}\n\n{\"text\": \"hi\"}\n",
            "line 2",
            "empty line",
        ),
        (
            "{\"text\": \"hi\"}\n[1, 2]\n",
            "line 2",
            "expected a JSON object",
        ),
        ("{\"text\": 3}\n", "line 1", "\"text\" must be a string"),
        (
            "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"hi\"}\n",
            "line 2",
            "missing field \"completion\"",
        ),
        (
            "{\"text\": \"hi\"}\n{\"prompt\": \"hi\", \"completion\": \"hi\"}\n",
            "line 2",
            "one kind per file",
        ),
        ("{\"id\": 1}\n", "line 1", "no known field"),
        ("{\"input_ids\": [1, -2]}\n", "line 1", "input_ids[1]"),
        (
            "{\"messages\": [{\"role\": \"user\"}]}\n",
            "line 1",
            "messages[0]: missing field \"content\"",
        ),
        (
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
            "line 1",
            "no \"assistant\"",
        ),
    ];
    for (i, (text, line, what)) in cases.iter().enumerate() {
        let p = write(dir.path(), &format!("bad{i}.jsonl"), text);
        let msg = err_of(load(&p, 8));
        assert!(msg.contains(line), "case {i}: {msg}");
        assert!(msg.contains(what), "case {i}: {msg}");
        assert!(msg.contains(&format!("bad{i}.jsonl")), "case {i}: {msg}");
    }
    let p = write(
        dir.path(),
        "labels.jsonl",
        "{\"input_ids\": [1, 2]}\n{\"input_ids\": [1, 2], \"labels\": [1]}\n",
    );
    let msg = err_of(load(&p, 8));
    assert!(
        msg.contains("line 2") && msg.contains("\"labels\" has 1 entries"),
        "{msg}"
    );
}

#[test]
fn format_comes_from_the_extension_unless_given() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "data.dat", "{\"text\": \"hello world\"}\n");
    let msg = err_of(load(&p, 8));
    assert!(msg.contains("cannot tell the data format"), "{msg}");
    let tok = tiny_tokenizer(CHATML);
    let cfg = DataConfig::new(8).with_format(DataFormat::from_str("jsonl").unwrap());
    let ds = load_dataset(&p, &tok, &cfg).unwrap();
    assert_eq!(
        ds.examples[0].input_ids,
        [ids("hello world"), vec![EOS]].concat()
    );
    // The same file read as plain text is one document of JSON punctuation (unknown words → <unk>).
    let cfg = DataConfig::new(64).with_format(DataFormat::Text);
    let ds = load_dataset(&p, &tok, &cfg).unwrap();
    assert_eq!(ds.kind, ExampleKind::Text);
    let e = DataFormat::from_str("csv").unwrap_err();
    assert!(
        matches!(&e, ModelError::Invalid(m) if m.contains("unknown data format \"csv\"")),
        "{e}"
    );
}

#[test]
fn eval_split_is_the_last_five_percent() {
    let dir = tempfile::tempdir().unwrap();
    let lines: String = (0..100)
        .map(|i| format!("{{\"input_ids\": [{i}, 1]}}\n"))
        .collect();
    let p = write(dir.path(), "t.jsonl", &lines);
    let tok = tiny_tokenizer(CHATML);
    let cfg = DataConfig::new(8);
    let s = load_splits(&p, None, &tok, &cfg).unwrap();
    assert_eq!((s.train.len(), s.eval.len()), (95, 5));
    let first_ids: Vec<u32> = s.eval.examples.iter().map(|e| e.input_ids[0]).collect();
    assert_eq!(first_ids, vec![95, 96, 97, 98, 99]);
    assert_eq!(s.train.examples[0].input_ids[0], 0);
    // Small sets hold out at least one example.
    let lines: String = (0..10)
        .map(|i| format!("{{\"input_ids\": [{i}, 1]}}\n"))
        .collect();
    let p10 = write(dir.path(), "t10.jsonl", &lines);
    let s = load_splits(&p10, None, &tok, &cfg).unwrap();
    assert_eq!((s.train.len(), s.eval.len()), (9, 1));
    assert_eq!(s.eval.examples[0].input_ids[0], 9);
    // With an eval file, all of the training file trains.
    let s = load_splits(&p, Some(&p10), &tok, &cfg).unwrap();
    assert_eq!((s.train.len(), s.eval.len()), (100, 10));
    // One example cannot be split.
    let p1 = write(dir.path(), "t1.jsonl", "{\"input_ids\": [3, 4]}\n");
    let e = load_splits(&p1, None, &tok, &cfg).unwrap_err();
    assert!(
        matches!(&e, ModelError::Invalid(m) if m.contains("t1.jsonl: 1 example(s) after tokenization: at least 2")),
        "{e}"
    );
}

fn toy_dataset(n: usize) -> Dataset {
    Dataset {
        examples: (0..n)
            .map(|i| Example::lm(vec![i as u32; 1 + i % 3]))
            .collect(),
        kind: ExampleKind::Tokens,
        source: PathBuf::from("toy"),
        skipped: 0,
    }
}

fn drain(b: &mut Batcher, n: usize) -> Vec<Vec<usize>> {
    (0..n).map(|_| b.next_indices()).collect()
}

#[test]
fn batcher_is_deterministic_resumes_exactly_and_reshuffles_each_epoch() {
    let n = 23;
    let mut a = Batcher::new(n, 4, 7, 0).unwrap();
    let mut b = Batcher::new(n, 4, 7, 0).unwrap();
    assert_eq!(a.batches_per_epoch(), 6);
    let ea = drain(&mut a, 12);
    assert_eq!(ea, drain(&mut b, 12));
    // Each epoch is a permutation of all examples, the last batch smaller, and epochs differ.
    let e0: Vec<usize> = ea[..6].concat();
    let e1: Vec<usize> = ea[6..].concat();
    assert_eq!(ea[5].len(), 3);
    let mut s0 = e0.clone();
    s0.sort();
    assert_eq!(s0, (0..n).collect::<Vec<_>>());
    let mut s1 = e1.clone();
    s1.sort();
    assert_eq!(s1, s0);
    assert_ne!(e0, e1);
    assert_ne!(e0, (0..n).collect::<Vec<_>>());
    // Another seed, another order.
    let mut c = Batcher::new(n, 4, 8, 0).unwrap();
    assert_ne!(drain(&mut c, 6).concat(), e0);

    // Resume from a cursor mid-epoch, at an epoch boundary and through JSON text.
    for stop in [3usize, 6, 7, 13] {
        let mut run = Batcher::new(n, 4, 7, 0).unwrap();
        drain(&mut run, stop);
        let state: serde_json::Value = serde_json::from_str(&run.state().to_string()).unwrap();
        let expected = drain(&mut run, 9);
        let mut resumed = Batcher::new(n, 4, 123, 0).unwrap(); // the seed comes from the state
        resumed.restore(&state).unwrap();
        assert_eq!(
            drain(&mut resumed, 9),
            expected,
            "resume after {stop} batches"
        );
    }
    // A state for another dataset size is refused.
    let mut other = Batcher::new(n + 1, 4, 7, 0).unwrap();
    let e = other.restore(&a.state()).unwrap_err();
    assert!(
        matches!(&e, ModelError::Invalid(m) if m.contains("state is for 23 examples in batches of 4, this run has 24")),
        "{e}"
    );
    let e = other
        .restore(&serde_json::json!({"n_examples": 24}))
        .unwrap_err();
    assert!(
        matches!(&e, ModelError::Json { context, message } if context == "batcher state" && message.contains("\"batch_size\"")),
        "{e}"
    );

    // Without shuffling: file order; drop_last drops the short batch.
    let mut plain = Batcher::new(5, 2, 7, 0)
        .unwrap()
        .with_shuffle(false)
        .with_drop_last(true)
        .unwrap();
    assert_eq!(
        drain(&mut plain, 3),
        vec![vec![0, 1], vec![2, 3], vec![0, 1]]
    );
    assert_eq!(plain.epoch(), 1);
}

#[test]
fn batches_are_right_padded_with_ignored_labels() {
    let ds = Dataset {
        examples: vec![
            Example {
                input_ids: vec![5, 6, 7, 8],
                labels: vec![IGN, IGN, 7, 8],
            },
            Example::lm(vec![9, 10]),
        ],
        kind: ExampleKind::PromptCompletion,
        source: PathBuf::from("x"),
        skipped: 0,
    };
    let dev = Device::Cpu;
    let tok = tiny_tokenizer(CHATML);
    let pad = pad_token_id(&tok);
    assert_eq!(pad, EOS); // no pad token: EOS
    let mut b = Batcher::new(2, 2, 0, pad).unwrap().with_shuffle(false);
    let batch = b.next_batch(&ds, &dev).unwrap();
    assert_eq!(batch.input_ids.dtype(), DType::U32);
    assert_eq!(batch.labels.dtype(), DType::I64);
    assert_eq!(batch.attention_mask.dtype(), DType::U32);
    assert_eq!((batch.batch_size(), batch.seq_len()), (2, 4));
    assert_eq!(
        batch.input_ids.to_vec2::<u32>().unwrap(),
        vec![vec![5, 6, 7, 8], vec![9, 10, EOS, EOS]]
    );
    assert_eq!(
        batch.labels.to_vec2::<i64>().unwrap(),
        vec![vec![IGN, IGN, 7, 8], vec![9, 10, IGN, IGN]]
    );
    assert_eq!(
        batch.attention_mask.to_vec2::<u32>().unwrap(),
        vec![vec![1, 1, 1, 1], vec![1, 1, 0, 0]]
    );
    // Counted: 7, 8 (row 0) and 10 (row 1; a row's first label is never predicted).
    assert_eq!(batch.n_tokens, 3);
    // A pad token, when set, wins over EOS.
    let mut tok = tok;
    tok.set_pad_token(Some("<unk>")).unwrap();
    assert_eq!(pad_token_id(&tok), 0);
    // Eval batches: in order, the last one smaller.
    let big = toy_dataset(5);
    let sizes: Vec<usize> = big
        .eval_batches(2, 0, &dev)
        .map(|b| b.unwrap().batch_size())
        .collect();
    assert_eq!(sizes, vec![2, 2, 1]);
}

/// Hand computation: -log softmax(logits[b, t])[labels[b, t + 1]] over the counted positions.
fn hand_nll(logits: &[Vec<Vec<f32>>], labels: &[Vec<i64>]) -> (f64, usize) {
    let mut sum = 0.0;
    let mut n = 0;
    for (lb, yb) in logits.iter().zip(labels) {
        for t in 0..lb.len() - 1 {
            let y = yb[t + 1];
            if y == IGN {
                continue;
            }
            let row: Vec<f64> = lb[t].iter().map(|&x| f64::from(x)).collect();
            let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
            sum += lse - row[y as usize];
            n += 1;
        }
    }
    (sum, n)
}

#[test]
fn loss_matches_a_hand_computation_and_ignores_minus_100() {
    let dev = Device::Cpu;
    let logits_v: Vec<Vec<Vec<f32>>> = vec![
        vec![
            vec![1.0, 2.0, 0.5, -1.0],
            vec![0.0, 0.0, 3.0, 1.0],
            vec![2.0, -2.0, 0.0, 0.5],
        ],
        vec![
            vec![100.0, 0.5, -100.0, 4.0], // large values: the log-softmax must be stable
            vec![1.0, 0.0, -1.0, 1.0],
            vec![0.3, 0.2, 0.1, 0.0],
        ],
    ];
    let labels_v: Vec<Vec<i64>> = vec![vec![IGN, 2, 0], vec![1, 3, IGN]];
    let logits = Tensor::new(logits_v.clone(), &dev).unwrap();
    let labels = Tensor::new(labels_v.clone(), &dev).unwrap();
    let (sum, n) = causal_lm_sum_nll(&logits, &labels).unwrap();
    let (hand_sum, hand_n) = hand_nll(&logits_v, &labels_v);
    assert_eq!((n, hand_n), (3, 3));
    let sum = sum.to_scalar::<f32>().unwrap() as f64;
    assert!((sum - hand_sum).abs() < 1e-3, "{sum} vs {hand_sum}");
    let (mean, n) = causal_lm_loss(&logits, &labels).unwrap();
    assert_eq!(n, 3);
    let mean = mean.to_scalar::<f32>().unwrap() as f64;
    assert!((mean - hand_sum / 3.0).abs() < 1e-4, "{mean}");
    assert!(mean.is_finite());
    // Changing the logits of positions whose target is ignored (or the last position) changes nothing.
    let mut other = logits_v.clone();
    other[1][2] = vec![9.0, 9.0, -9.0, 0.0];
    other[0][2] = vec![-5.0, 1.0, 7.0, 0.0];
    let (m2, _) = causal_lm_loss(&Tensor::new(other, &dev).unwrap(), &labels).unwrap();
    assert_eq!(m2.to_scalar::<f32>().unwrap() as f64, mean);
    // bf16 logits are computed in f32.
    let (mb, _) = causal_lm_loss(&logits.to_dtype(DType::BF16).unwrap(), &labels).unwrap();
    assert!((mb.to_scalar::<f32>().unwrap() as f64 - mean).abs() < 0.05);
    // No counted token: a zero loss, no NaN.
    let none = Tensor::new(vec![vec![IGN; 3]; 2], &dev).unwrap();
    let (z, n) = causal_lm_loss(&logits, &none).unwrap();
    assert_eq!((z.to_scalar::<f32>().unwrap(), n), (0.0, 0));
    // Out-of-vocabulary labels are an error.
    let bad = Tensor::new(vec![vec![0i64, 4, 0], vec![0, 0, 0]], &dev).unwrap();
    let e = causal_lm_loss(&logits, &bad).unwrap_err();
    assert!(
        matches!(&e, ModelError::Invalid(m) if m.contains("label 4 at row 0, position 1 is outside the vocabulary (0..4)")),
        "{e}"
    );

    let mut meter = NllMeter::new();
    let (s, n) = causal_lm_sum_nll(&logits, &labels).unwrap();
    meter.add(&s, n).unwrap();
    meter.add_value(1.5, 1);
    assert_eq!(meter.tokens, 4);
    assert!((meter.mean_nll() - (hand_sum + 1.5) / 4.0).abs() < 1e-3);
    assert!((meter.perplexity() - meter.mean_nll().exp()).abs() < 1e-9);
}

#[test]
fn loss_has_a_gradient_for_the_logits() {
    let dev = Device::Cpu;
    let logits_v: Vec<Vec<Vec<f32>>> = vec![vec![
        vec![0.5, -0.5, 1.0],
        vec![2.0, 0.0, -1.0],
        vec![0.0, 0.0, 0.0],
    ]];
    let var = Var::new(logits_v.clone(), &dev).unwrap();
    let labels = Tensor::new(vec![vec![IGN, 2, 0]], &dev).unwrap();
    let (loss, n) = causal_lm_loss(var.as_tensor(), &labels).unwrap();
    assert_eq!(n, 2);
    let grads = loss.backward().unwrap();
    let g = grads
        .get(var.as_tensor())
        .expect("a gradient for the logits")
        .to_vec3::<f32>()
        .unwrap();
    // d mean CE / d logits[t] = (softmax(logits[t]) - onehot(label[t + 1])) / n, zero on the last position.
    for (t, target) in [(0usize, 2usize), (1, 0)] {
        let row = &logits_v[0][t];
        let z: f32 = row.iter().map(|x| x.exp()).sum();
        for k in 0..3 {
            let p = row[k].exp() / z;
            let want = (p - if k == target { 1.0 } else { 0.0 }) / n as f32;
            assert!(
                (g[0][t][k] - want).abs() < 1e-5,
                "t{t} k{k}: {} vs {want}",
                g[0][t][k]
            );
        }
    }
    assert_eq!(g[0][2], vec![0.0; 3]);
}

fn repo_data(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../data")
        .join(rel)
}

#[test]
fn bundled_demo_data_loads() {
    let tok = tiny_tokenizer(CHATML);
    let chat = load_splits(
        repo_data("chat/train.jsonl"),
        None,
        &tok,
        &DataConfig::new(256),
    )
    .unwrap();
    assert_eq!(chat.train.kind, ExampleKind::Chat);
    assert_eq!(chat.train.len() + chat.eval.len() + chat.train.skipped, 500);
    assert_eq!(chat.eval.len(), 25);
    assert!(chat.train.examples.iter().all(|e| e.n_targets() > 0));
    let text = load_dataset(
        repo_data("shakespeare/train.txt"),
        &tok,
        &DataConfig::new(128),
    )
    .unwrap();
    assert_eq!(text.kind, ExampleKind::Text);
    assert!(text.len() > 100, "{}", text.len());
    assert!(
        text.examples[..text.len() - 1]
            .iter()
            .all(|e| e.len() == 128)
    );
}

/// Opt-in (needs the SmolLM2 GGUF of `scripts/fetch_smollm2.sh`, or `PEFT_SMOLLM2_GGUF`): the bundled data
/// with the real byte-level BPE tokenizer and ChatML template; every conversation's assistant spans must be
/// stable. `cargo test -p peft-models --lib data::tests::bundled_data_with_smollm2 -- --ignored --nocapture`
#[test]
#[ignore = "needs the SmolLM2 GGUF: bash scripts/fetch_smollm2.sh"]
fn bundled_data_with_smollm2_tokenizer() {
    let path = crate::gguf::tests::smollm2_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let tok = Tokenizer::from_gguf_metadata(&content.metadata).unwrap();
    let chat = load_splits(
        repo_data("chat/train.jsonl"),
        None,
        &tok,
        &DataConfig::new(256),
    )
    .unwrap();
    let e = &chat.train.examples[0];
    let shown: Vec<u32> = e
        .input_ids
        .iter()
        .zip(&e.labels)
        .filter(|(_, l)| **l != IGN)
        .map(|(t, _)| *t)
        .collect();
    let answer = tok.decode(&shown, false).unwrap();
    eprintln!(
        "chat: {} train + {} eval, {} skipped, {} target tokens; first answer span {answer:?}",
        chat.train.len(),
        chat.eval.len(),
        chat.train.skipped,
        chat.train.n_targets()
    );
    assert!(answer.ends_with("<|im_end|>\n"), "{answer:?}");
    assert_eq!(chat.train.len() + chat.eval.len(), 500);
    let text = load_splits(
        repo_data("shakespeare/train.txt"),
        None,
        &tok,
        &DataConfig::new(256),
    )
    .unwrap();
    eprintln!(
        "shakespeare: {} train + {} eval windows of 256 ({} tokens)",
        text.train.len(),
        text.eval.len(),
        text.train.n_tokens() + text.eval.n_tokens()
    );
}
