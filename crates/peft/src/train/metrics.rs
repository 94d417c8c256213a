//! Training metrics: the JSONL log, the loss-curve SVG and the progress callback.
//!
//! - [`MetricsLog`] appends one JSON object per line (`{"kind":"train","step":…,"loss":…}` or
//!   `{"kind":"eval",…}`) and flushes each line, so a crashed run keeps every line it reported.
//! - [`loss_curve_svg`] draws train and eval loss against the step as a standalone SVG (grid, tick labels,
//!   axis names, a legend) with plotters' SVG backend.
//! - [`Progress`] is what the trainer hands its progress callback after every step and evaluation; the
//!   library never prints, the CLI draws its bar from it.
//!
//! Non-finite numbers (a diverged loss) are written as JSON `null` and read back as NaN.
//!
//! ```
//! use peft::train::metrics::{loss_curve_svg, MetricRecord, TrainRecord};
//! let records: Vec<MetricRecord> = (1..=3)
//!     .map(|s| MetricRecord::Train(TrainRecord { step: s, loss: 3.0 / s as f64, ..Default::default() }))
//!     .collect();
//! let svg = loss_curve_svg(&records, "run");
//! assert!(svg.starts_with("<svg") && svg.contains("<polyline"));
//! ```

use crate::{PeftError, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Serialises non-finite floats as `null` and reads `null` back as NaN.
mod finite_or_null {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
}

/// One logged training window (one step when `log_every` is 1).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    /// Optimizer steps completed (1-based: the step this record ends with).
    pub step: u64,
    /// Mean training loss over the steps of the window (each step's loss is its mean over micro-batches,
    /// extra loss terms included).
    #[serde(with = "finite_or_null")]
    pub loss: f64,
    /// Learning rate of the last step of the window (the rate that step used).
    #[serde(with = "finite_or_null")]
    pub lr: f64,
    /// Global gradient norm of the last step, before clipping.
    #[serde(with = "finite_or_null")]
    pub grad_norm: f64,
    /// Tokens seen in the window, when the micro-batches report them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Tokens per second of wall time in the window, when the micro-batches report tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_s: Option<f64>,
    /// Wall time of the window's steps, in seconds.
    #[serde(default)]
    pub step_time_s: f64,
    /// Mean of each extra loss term over the window, by name.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub extra: IndexMap<String, f64>,
}

/// One evaluation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Optimizer steps completed when the evaluation ran.
    pub step: u64,
    /// Mean loss per token (`Σ nll / Σ tokens`).
    #[serde(with = "finite_or_null")]
    pub eval_loss: f64,
    /// Tokens evaluated.
    pub eval_tokens: u64,
    /// Wall time of the evaluation, in seconds.
    #[serde(default)]
    pub eval_time_s: f64,
}

/// A line of the metrics log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricRecord {
    /// A training window.
    Train(TrainRecord),
    /// An evaluation.
    Eval(EvalRecord),
}

impl MetricRecord {
    /// The step the record belongs to.
    pub fn step(&self) -> u64 {
        match self {
            MetricRecord::Train(r) => r.step,
            MetricRecord::Eval(r) => r.step,
        }
    }
}

/// An append-only JSONL file of [`MetricRecord`]s, flushed after every line.
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens `path` for appending, creating it (and its directory) if needed.
    pub fn append(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| PeftError::io(&path, e))?;
        Ok(Self { path, file })
    }

    /// Creates `path` empty (truncating an existing file) and opens it for appending.
    pub fn create(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
        }
        std::fs::write(path, b"").map_err(|e| PeftError::io(path, e))?;
        Self::append(path)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one record as a line and flushes it.
    pub fn write(&mut self, record: &MetricRecord) -> Result<()> {
        let mut line = serde_json::to_string(record).map_err(|e| PeftError::Json {
            context: self.path.display().to_string(),
            message: e.to_string(),
        })?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| PeftError::io(&self.path, e))
    }

    /// Replaces the whole file with `records` (atomically), then keeps appending. A resumed run uses this
    /// to drop the lines written after the checkpoint it resumes from.
    pub fn rewrite(&mut self, records: &[MetricRecord]) -> Result<()> {
        let mut text = String::new();
        for r in records {
            text.push_str(&serde_json::to_string(r).map_err(|e| PeftError::Json {
                context: self.path.display().to_string(),
                message: e.to_string(),
            })?);
            text.push('\n');
        }
        crate::io::atomic_write(&self.path, text.as_bytes())?;
        *self = Self::append(&self.path)?;
        Ok(())
    }
}

/// Reads every record of a metrics log.
pub fn read_metrics(path: impl AsRef<Path>) -> Result<Vec<MetricRecord>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| PeftError::Json {
                context: format!("{}:{}", path.display(), i + 1),
                message: e.to_string(),
            })
        })
        .collect()
}

/// What the progress callback sees after each step or evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct Progress {
    /// Optimizer steps completed.
    pub step: u64,
    /// The step count the run stops at.
    pub max_steps: u64,
    /// The last step's training loss.
    pub loss: f64,
    /// The last step's learning rate.
    pub lr: f64,
    /// The last step's gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens per second over the last step, when the micro-batches report tokens.
    pub tokens_per_s: Option<f64>,
    /// The latest evaluation loss, if any.
    pub eval_loss: Option<f64>,
    /// Wall time spent in training steps since this trainer was created (or resumed).
    pub elapsed: Duration,
    /// Estimated time to `max_steps` at this session's mean step time.
    pub eta: Option<Duration>,
}

/// The progress callback a trainer calls after each step and evaluation (a CLI draws its bar from it).
pub type ProgressCallback = Box<dyn FnMut(&Progress) + Send>;

/// Picks "nice" tick positions (1, 2 or 5 times a power of ten) covering `[lo, hi]`.
fn nice_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, usize) {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let first = (lo / step).ceil() as i64;
    let last = (hi / step).floor() as i64;
    let ticks = (first..=last).map(|i| i as f64 * step).collect();
    (ticks, decimals)
}

/// Averages consecutive points down to at most `max` points (a long run stays a small file).
fn downsample(points: Vec<(f64, f64)>, max: usize) -> Vec<(f64, f64)> {
    if points.len() <= max {
        return points;
    }
    let chunk = points.len().div_ceil(max);
    points
        .chunks(chunk)
        .map(|c| {
            let n = c.len() as f64;
            (
                c.iter().map(|p| p.0).sum::<f64>() / n,
                c.iter().map(|p| p.1).sum::<f64>() / n,
            )
        })
        .collect()
}

/// Draws train loss and eval loss against the step as a standalone SVG document (plotters' SVG backend).
///
/// Non-finite losses are left out. The y axis spans the finite losses with a margin; the x axis the steps,
/// from 0 (an evaluation before training sits at the starting step). The two curves are the only
/// `<polyline>`s, train first; evaluations are also marked by `<circle>`s.
pub fn loss_curve_svg(records: &[MetricRecord], title: &str) -> String {
    let train: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| match r {
            MetricRecord::Train(t) if t.loss.is_finite() => Some((t.step as f64, t.loss)),
            _ => None,
        })
        .collect();
    let eval: Vec<(f64, f64)> = records
        .iter()
        .filter_map(|r| match r {
            MetricRecord::Eval(e) if e.eval_loss.is_finite() => Some((e.step as f64, e.eval_loss)),
            _ => None,
        })
        .collect();
    let train = downsample(train, 2000);
    let mut svg = String::new();
    // Drawing into a String cannot fail for I/O reasons; an error here would be a plotters bug, and the
    // document drawn so far is still returned.
    let _ = draw_loss_curve(&mut svg, &train, &eval, title);
    svg
}

fn draw_loss_curve(
    svg: &mut String,
    train: &[(f64, f64)],
    eval: &[(f64, f64)],
    title: &str,
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    const W: u32 = 800;
    const H: u32 = 480;
    const TRAIN_COLOR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
    const EVAL_COLOR: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
    let all: Vec<&(f64, f64)> = train.iter().chain(eval.iter()).collect();
    let (mut x0, mut x1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (mut y0, mut y1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    if all.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    // Steps start at 0 on the axis.
    x0 = x0.min(0.0);
    if x1 - x0 < 1.0 {
        x1 = x0 + 1.0;
    }
    let pad = if y1 - y0 < 1e-12 {
        (y0.abs() * 0.05).max(1e-3)
    } else {
        (y1 - y0) * 0.05
    };
    (y0, y1) = (y0 - pad, y1 + pad);
    let (_, xd) = nice_ticks(x0, x1, 8);
    let (_, yd) = nice_ticks(y0, y1, 6);

    let root = SVGBackend::with_string(svg, (W, H)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    // Axis lines and ticks are drawn as paths (polylines) by plotters: leave them out (a frame is drawn
    // below) so that the curves are the document's only polylines.
    chart
        .configure_mesh()
        .x_labels(8)
        .y_labels(6)
        .x_desc("step")
        .y_desc("loss")
        .axis_style(TRANSPARENT)
        .bold_line_style(RGBColor(0xe6, 0xe6, 0xe6))
        .light_line_style(TRANSPARENT)
        .x_label_formatter(&|x| format!("{x:.xd$}"))
        .y_label_formatter(&|y| format!("{y:.yd$}"))
        .label_style(("sans-serif", 14))
        .draw()?;
    chart
        .plotting_area()
        .draw(&Rectangle::new([(x0, y0), (x1, y1)], BLACK.stroke_width(1)))?;
    let marker = |color: RGBColor| {
        move |(x, y): (i32, i32)| Rectangle::new([(x, y - 2), (x + 20, y + 2)], color.filled())
    };
    if !train.is_empty() {
        chart
            .draw_series(LineSeries::new(
                train.iter().copied(),
                TRAIN_COLOR.stroke_width(2),
            ))?
            .label("train loss")
            .legend(marker(TRAIN_COLOR));
    }
    if !eval.is_empty() {
        chart
            .draw_series(LineSeries::new(
                eval.iter().copied(),
                EVAL_COLOR.stroke_width(2),
            ))?
            .label("eval loss")
            .legend(marker(EVAL_COLOR));
        chart.draw_series(eval.iter().map(|&p| Circle::new(p, 3, EVAL_COLOR.filled())))?;
    }
    if all.is_empty() {
        let style = TextStyle::from(("sans-serif", 16))
            .color(&RGBColor(0x88, 0x88, 0x88))
            .pos(Pos::new(HPos::Center, VPos::Center));
        root.draw_text("no data", &style, (W as i32 / 2, H as i32 / 2))?;
    } else {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(0xcc, 0xcc, 0xcc))
            .label_font(("sans-serif", 14))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// Writes [`loss_curve_svg`] to `path` atomically.
pub fn write_loss_curve(
    path: impl AsRef<Path>,
    records: &[MetricRecord],
    title: &str,
) -> Result<()> {
    crate::io::atomic_write(path.as_ref(), loss_curve_svg(records, title).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_nice_and_cover_the_range() {
        let (t, d) = nice_ticks(0.0, 10.0, 5);
        assert_eq!(t, vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
        assert_eq!(d, 0);
        let (t, d) = nice_ticks(1.93, 2.41, 6);
        assert_eq!(d, 1);
        assert!(t.first().unwrap() >= &1.93 && t.last().unwrap() <= &2.41);
    }

    #[test]
    fn records_round_trip_with_nan_as_null() {
        let r = MetricRecord::Train(TrainRecord {
            step: 3,
            loss: f64::NAN,
            lr: 1e-4,
            grad_norm: 0.5,
            tokens: Some(12),
            ..Default::default()
        });
        let s = serde_json::to_string(&r).unwrap();
        assert!(
            s.starts_with(r#"{"kind":"train","step":3,"loss":null"#),
            "{s}"
        );
        let back: MetricRecord = serde_json::from_str(&s).unwrap();
        match back {
            MetricRecord::Train(t) => {
                assert!(t.loss.is_nan());
                assert_eq!(t.tokens, Some(12));
            }
            _ => panic!("kind"),
        }
    }

    #[test]
    fn empty_and_escaped_curves_render() {
        let svg = loss_curve_svg(&[], "a < b & c");
        assert!(svg.contains("a &lt; b &amp; c"));
        assert!(svg.contains("no data"));
        assert!(!svg.contains("<polyline"));
    }
}
