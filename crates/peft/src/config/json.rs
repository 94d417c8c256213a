//! JSON as Python writes and compares it.
//!
//! PEFT saves `adapter_config.json` with `json.dumps(d, indent=2, sort_keys=True)`: keys sorted at every depth,
//! two-space indent, `": "` between key and value, `ensure_ascii` (every non-ASCII character as `\uXXXX`), floats
//! in Python's `repr` (`0.0`, `6e-05`, `1e+16`) and no trailing newline. [`python_dumps`] writes exactly that;
//! [`json_content_eq`] compares two documents by content, the only sound comparison since PEFT writes its set-valued
//! fields in hash order.

use serde_json::{Number, Value};
use std::fmt::Write as _;

/// Keys whose list values PEFT holds as Python sets (or that are sets by meaning): compared without order.
const SET_VALUED_KEYS: &[&str] = &[
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "feedforward_modules",
];

/// `json.dumps(value, indent=2, sort_keys=True)` as Python 3 writes it, byte for byte.
///
/// Non-finite floats cannot occur in a [`serde_json::Value`], so `NaN` / `Infinity` are never written.
pub fn python_dumps(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0);
    out
}

fn write_indent(out: &mut String, level: usize) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("  ");
    }
}

fn write_value(out: &mut String, value: &Value, level: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_indent(out, level + 1);
                write_value(out, item, level + 1);
            }
            write_indent(out, level);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            // Rust orders `str` by UTF-8 bytes, which is Unicode code point order, as Python sorts `str`.
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_indent(out, level + 1);
                write_string(out, key);
                out.push_str(": ");
                write_value(out, item, level + 1);
            }
            write_indent(out, level);
            out.push('}');
        }
    }
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(f) = n.as_f64() {
        out.push_str(&python_float_repr(f));
    } else {
        // Only reachable with serde_json's `arbitrary_precision`; its text is already JSON.
        let _ = write!(out, "{n}");
    }
}

/// Python's `repr(float)` (which `json.dumps` uses): the shortest digits that round-trip, in positional notation
/// when the decimal exponent is in `-4..16`, else as `d.ddde±XX`; integral values keep a `.0`.
pub fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".to_string();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.to_string();
    }
    // Rust's `{:e}` gives the shortest round-tripping digits, e.g. "-1.2345e-5" or "1e16".
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let n_digits = digits.len() as i32;
    // The value is 0.DIGITS × 10^decpt.
    let decpt = exp + 1;
    let mut out = String::new();
    if x < 0.0 {
        out.push('-');
    }
    if -4 < decpt && decpt <= 16 {
        if decpt <= 0 {
            out.push_str("0.");
            for _ in 0..(-decpt) {
                out.push('0');
            }
            out.push_str(&digits);
        } else if decpt >= n_digits {
            out.push_str(&digits);
            for _ in 0..(decpt - n_digits) {
                out.push('0');
            }
            out.push_str(".0");
        } else {
            let (int_part, frac_part) = digits.split_at(decpt as usize);
            out.push_str(int_part);
            out.push('.');
            out.push_str(frac_part);
        }
    } else {
        let (first, rest) = digits.split_at(1);
        out.push_str(first);
        if !rest.is_empty() {
            out.push('.');
            out.push_str(rest);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

/// A JSON string literal as Python's `json.dumps` writes it with `ensure_ascii=True`.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// Whether two JSON documents hold the same content.
///
/// Objects must have the same key set and equal values; numbers compare numerically (`1 == 1.0`); arrays compare
/// element by element, except the values of `target_modules`, `exclude_modules`, `modules_to_save` and
/// `feedforward_modules`, which compare as sets (PEFT writes its sets in hash order, which varies between runs).
pub fn json_content_eq(a: &Value, b: &Value) -> bool {
    content_eq(a, b, false)
}

fn content_eq(a: &Value, b: &Value, as_set: bool) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => number_eq(x, y),
        (Value::Array(x), Value::Array(y)) if as_set => {
            x.iter().all(|i| y.iter().any(|j| content_eq(i, j, false)))
                && y.iter().all(|j| x.iter().any(|i| content_eq(i, j, false)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(i, j)| content_eq(i, j, false))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter().all(|(k, v)| {
                    y.get(k)
                        .is_some_and(|w| content_eq(v, w, SET_VALUED_KEYS.contains(&k.as_str())))
                })
        }
        _ => a == b,
    }
}

fn number_eq(x: &Number, y: &Number) -> bool {
    if let (Some(i), Some(j)) = (x.as_i64(), y.as_i64()) {
        return i == j;
    }
    if let (Some(i), Some(j)) = (x.as_u64(), y.as_u64()) {
        return i == j;
    }
    match (x.as_f64(), y.as_f64()) {
        (Some(i), Some(j)) => i == j,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn float_repr_matches_python() {
        // (value, Python's repr) pairs printed by CPython 3.
        let cases: &[(f64, &str)] = &[
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (1e-05, "1e-05"),
            (6e-05, "6e-05"),
            (0.0001, "0.0001"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (123456789.123, "123456789.123"),
            (1.5e-07, "1.5e-07"),
            (2.5e+20, "2.5e+20"),
            (5e-324, "5e-324"),
            (1.7976931348623157e308, "1.7976931348623157e+308"),
            (1.0 / 3.0, "0.3333333333333333"),
            (100.0, "100.0"),
            (1234567890123456.7, "1234567890123456.8"),
            (12345678901234567.0, "1.2345678901234568e+16"),
            (-2.5, "-2.5"),
            (0.05, "0.05"),
            (1e22, "1e+22"),
            (9.999999999999999e-05, "9.999999999999999e-05"),
            (3e-05, "3e-05"),
            (1e100, "1e+100"),
        ];
        for &(x, want) in cases {
            assert_eq!(python_float_repr(x), want, "repr of {x:e}");
        }
    }

    #[test]
    fn dumps_matches_python_layout_and_escapes() {
        let v = json!({
            "b": "é\u{ff}\u{1F600}\u{7f}\u{1}\"\\\n\t\u{8}\u{c}\r/",
            "a": [],
            "c": {},
            "d": [{}],
            "e": {"z": 1, "y": [1, 2.0]},
        });
        // `json.dumps(v, indent=2, sort_keys=True)` from CPython.
        let want = "{\n  \"a\": [],\n  \"b\": \"\\u00e9\\u00ff\\ud83d\\ude00\\u007f\\u0001\\\"\\\\\\n\\t\\b\\f\\r/\",\n  \"c\": {},\n  \"d\": [\n    {}\n  ],\n  \"e\": {\n    \"y\": [\n      1,\n      2.0\n    ],\n    \"z\": 1\n  }\n}";
        assert_eq!(python_dumps(&v), want);
    }

    #[test]
    fn content_eq_numbers_sets_and_keys() {
        assert!(json_content_eq(&json!({"a": 1}), &json!({"a": 1.0})));
        assert!(!json_content_eq(&json!({"a": 1}), &json!({"a": 1.5})));
        assert!(json_content_eq(
            &json!({"target_modules": ["q", "v"], "x": [1, 2]}),
            &json!({"target_modules": ["v", "q"], "x": [1, 2]})
        ));
        assert!(!json_content_eq(
            &json!({"x": [1, 2]}),
            &json!({"x": [2, 1]})
        ));
        assert!(!json_content_eq(
            &json!({"target_modules": ["q"]}),
            &json!({"target_modules": ["q", "v"]})
        ));
        assert!(!json_content_eq(
            &json!({"a": 1}),
            &json!({"a": 1, "b": null})
        ));
        assert!(json_content_eq(
            &json!({"a": {"b": [1, {"c": 2}]}}),
            &json!({"a": {"b": [1.0, {"c": 2}]}})
        ));
        assert!(!json_content_eq(
            &json!({"target_modules": "q"}),
            &json!({"target_modules": ["q"]})
        ));
    }
}
