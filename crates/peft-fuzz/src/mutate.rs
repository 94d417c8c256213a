//! The mutations: AFL-style havoc (bit flips, interesting integers, block deletes, inserts and splices) plus
//! text-aware ones (numbers swapped for edge values, JSON and Jinja tokens inserted), stacked 1–6 per input.

/// xorshift64*: a small, fast, reproducible generator (the same seed gives the same run).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed` (any value; 0 is mapped to a fixed non-zero state).
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// Integers that break length and offset arithmetic, written little-endian in 1, 2, 4 or 8 bytes.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0x8000,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    1 << 62,
    i64::MAX as u64,
    u64::MAX,
    u64::MAX - 1,
];

/// Decimal numbers that break parsers and size checks.
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "-0",
    "1.5",
    "1e308",
    "-1e308",
    "1e-320",
    "NaN",
    "Infinity",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "99999999999999999999999",
    "1000000000000",
    "0.0000001",
];

/// Tokens of the text formats (JSON, JSONL, Jinja) inserted at random.
const TOKENS: &[&str] = &[
    "null",
    "true",
    "false",
    "[]",
    "{}",
    "\"\"",
    "\"x\"",
    ",",
    ":",
    "{",
    "}",
    "[",
    "]",
    "\"",
    "\\",
    "\\u0000",
    "\\ud800",
    "\n",
    "{{",
    "}}",
    "{%",
    "%}",
    "{#",
    "#}",
    "{% for x in messages %}",
    "{% endfor %}",
    "{% if",
    "{% endif %}",
    "{% set x = ",
    "loop.index",
    "range(",
    ")",
    "|",
    "| tojson",
    "| length",
    "~",
    "*",
    "messages[0]",
    "raise_exception(",
    "strftime_now(",
    "'%",
    "%Y",
    "%Q",
    "\"input_ids\"",
    "\"labels\"",
    "\"text\"",
    "\"messages\"",
    "\"role\"",
    "\"content\"",
    "\"prompt\"",
    "\"completion\"",
    "\"peft_type\"",
    "\"LORA\"",
    "\"HRA\"",
    "\"ROAD\"",
    "\"DELORA\"",
    "\"MISS\"",
    "\"GRALORA\"",
    "\"C3A\"",
    "\"HIRA\"",
    "\"BEFT\"",
    "\"VBLORA\"",
    "\"GLORA\"",
    "\"FOURIERFT\"",
    "\"PEANUT\"",
    "\"SUPERTUNING\"",
    "\"SHIRA\"",
    "\"PVERA\"",
    "\"RANDLORA\"",
    "\"TRAINABLE_TOKENS\"",
    "\"DEFT\"",
    "\"UNILORA\"",
    "\"save_indices\"",
    "\"FROD\"",
    "\"sparse_rate\"",
    "\"OSF\"",
    "\"effective_rank\"",
    "\"qr\"",
    "\"pissa\"",
    "\"olora\"",
    "\"bat\"",
    "\"mini\"",
    "\"road_4\"",
    "\"r\"",
    "\"lora_alpha\"",
    "\"target_modules\"",
    "\"rank_pattern\"",
    "\"alpha_pattern\"",
    "\"layers_to_transform\"",
    "\"modules_to_save\"",
    "\"use_dora\"",
    "\"dtype\"",
    "\"shape\"",
    "\"data_offsets\"",
    "\"F32\"",
    "\"F16\"",
    "\"BF16\"",
    "\"I64\"",
    "\"__metadata__\"",
    "é",
    "\u{10FFFF}",
];

/// Mutates `data` in place with 1–6 stacked mutations; `hot` (when non-zero) is the length of the prefix
/// where most byte-level mutations land (a GGUF header, a safetensors header); `other` is another corpus
/// entry for splices; `max_len` bounds the result.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8], hot: usize, max_len: usize) {
    let rounds = 1 + rng.below(6);
    for _ in 0..rounds {
        mutate_once(rng, data, other, hot);
    }
    data.truncate(max_len);
}

fn offset(rng: &mut Rng, len: usize, hot: usize) -> usize {
    if hot > 0 && hot < len && !rng.one_in(5) {
        rng.below(hot)
    } else {
        rng.below(len)
    }
}

fn mutate_once(rng: &mut Rng, d: &mut Vec<u8>, other: &[u8], hot: usize) {
    let len = d.len();
    match rng.below(14) {
        0 if len > 0 => {
            let i = offset(rng, len, hot);
            d[i] ^= 1 << rng.below(8);
        }
        1 if len > 0 => {
            let i = offset(rng, len, hot);
            d[i] = rng.next_u64() as u8;
        }
        2 | 3 if len > 0 => {
            let width = [1usize, 2, 4, 8][rng.below(4)];
            let v = INTERESTING[rng.below(INTERESTING.len())];
            let v = if rng.one_in(3) { v.wrapping_neg() } else { v };
            let i = offset(rng, len, hot);
            for (k, b) in v.to_le_bytes().iter().take(width).enumerate() {
                if let Some(x) = d.get_mut(i + k) {
                    *x = *b;
                }
            }
        }
        4 if len > 0 => {
            // add or subtract a little from a little-endian u32
            let i = offset(rng, len, hot);
            if i + 4 <= len {
                let mut b = [0u8; 4];
                b.copy_from_slice(&d[i..i + 4]);
                let delta = rng.below(35) as u32 + 1;
                let v = if rng.one_in(2) {
                    u32::from_le_bytes(b).wrapping_add(delta)
                } else {
                    u32::from_le_bytes(b).wrapping_sub(delta)
                };
                d[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
        }
        5 if len > 1 => {
            let i = offset(rng, len, hot);
            let n = 1 + rng.below((len - i).min(64));
            d.drain(i..i + n);
        }
        6 => {
            let i = rng.below(len + 1);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            d.splice(i..i, bytes);
        }
        7 if len > 1 => {
            // duplicate a block
            let i = rng.below(len);
            let n = 1 + rng.below((len - i).min(256));
            let block = d[i..i + n].to_vec();
            let at = rng.below(len + 1);
            d.splice(at..at, block);
        }
        8 if len > 0 => {
            d.truncate(offset(rng, len, hot));
        }
        9 if !other.is_empty() => {
            // splice: a prefix of this input and a suffix of another
            let i = rng.below(len + 1);
            let j = rng.below(other.len());
            d.truncate(i);
            d.extend_from_slice(&other[j..]);
        }
        10 | 11 => {
            // a run of digits (with sign, dot, exponent) replaced by an edge value
            let digits: Vec<usize> = (0..len).filter(|&i| d[i].is_ascii_digit()).collect();
            if let Some(&start) = digits.get(rng.below(digits.len())) {
                let mut a = start;
                while a > 0 && matches!(d[a - 1], b'0'..=b'9' | b'-' | b'.') {
                    a -= 1;
                }
                let mut b = start;
                while b < len && matches!(d[b], b'0'..=b'9' | b'.' | b'e' | b'E' | b'-' | b'+') {
                    b += 1;
                }
                let n = NUMBERS[rng.below(NUMBERS.len())];
                d.splice(a..b, n.bytes());
            }
        }
        12 => {
            let t = TOKENS[rng.below(TOKENS.len())];
            let i = rng.below(len + 1);
            d.splice(i..i, t.bytes());
        }
        _ if len > 0 => {
            // delete or double one structural character
            let structural: Vec<usize> =
                (0..len).filter(|&i| b"\"{}[],:%".contains(&d[i])).collect();
            if let Some(&i) = structural.get(rng.below(structural.len())) {
                if rng.one_in(2) {
                    d.remove(i);
                } else {
                    d.insert(i, d[i]);
                }
            }
        }
        _ => d.push(rng.next_u64() as u8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_mutants() {
        let seed = b"{\"r\": 8, \"lora_alpha\": 16}".to_vec();
        let run = |s| {
            let mut rng = Rng::new(s);
            (0..200)
                .map(|_| {
                    let mut d = seed.clone();
                    mutate(&mut rng, &mut d, b"[1, 2]", 0, 1 << 16);
                    d
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // mutants differ from the seed and from each other
        let m = run(7);
        assert!(m.iter().filter(|d| **d != seed).count() > 190);
        let distinct: std::collections::HashSet<_> = m.iter().collect();
        assert!(distinct.len() > 150, "{}", distinct.len());
    }

    #[test]
    fn mutants_respect_the_length_bound() {
        let mut rng = Rng::new(1);
        let mut d = vec![b'7'; 100];
        for _ in 0..1000 {
            mutate(&mut rng, &mut d, &[b'x'; 300], 0, 128);
            assert!(d.len() <= 128);
        }
    }
}
