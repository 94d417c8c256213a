//! `x · Wᵀ + b` in f32 for a frozen bf16 / f16 weight: PEFT's autocast over a half-precision base, where the
//! weight is held in half precision and every product is computed in f32.

use super::cpu::{contiguous_part, gemm_parallelism, par_rows};
use candle_core::{CpuStorage, CustomOp1, D, DType, Layout, Result, Shape, Storage, Tensor, bail};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

/// Elements of the weight converted to f32 at once (4 MiB): bounds the scratch memory of a forward or backward
/// whatever the layer's size.
const BAND_ELEMS: usize = 1 << 20;

/// Whether `w` is a half-precision weight (bf16 or f16) that [`half_linear`] multiplies in f32.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let w = Tensor::zeros((2, 3), DType::BF16, &Device::Cpu).unwrap();
/// assert!(peft::ops::is_half(&w));
/// assert!(!peft::ops::is_half(&w.to_dtype(DType::F32).unwrap()));
/// ```
pub fn is_half(w: &Tensor) -> bool {
    matches!(w.dtype(), DType::BF16 | DType::F16)
}

/// `x Wᵀ + b` for a frozen half-precision weight `w` `[out, in]` (bf16 or f16, any strides) and an optional
/// bias `[out]` (any float dtype), over any leading dimensions of an f32 / f64 `x`; the result has `x`'s
/// dtype. Gradients flow to `x` only (`g · W`, also in `x`'s dtype); the weight and bias are frozen.
///
/// On the CPU with an f32 `x` this is one custom op that converts bands of the weight's rows (≤ 4 MiB of f32)
/// into a scratch buffer and multiplies them with `gemm`, so neither the forward, the backward nor the autograd
/// graph holds an f32 copy of the weight. The numbers are those of `x · W.to_f32()ᵀ`: converting bf16 / f16 to
/// f32 is exact. Elsewhere (other devices, f64) the weight is converted to `x`'s dtype whole and multiplied
/// with [`crate::ops::frozen_linear_reference`].
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// let dev = Device::Cpu;
/// let w = Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &dev).unwrap().to_dtype(DType::BF16).unwrap();
/// let x = Tensor::new(&[[1f32, 0., -1.]], &dev).unwrap();
/// let y = peft::ops::half_linear(&x, &w, None).unwrap();
/// assert_eq!(y.dtype(), DType::F32);
/// assert_eq!(y.to_vec2::<f32>().unwrap(), [[-2., -2.]]);
/// ```
pub fn half_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if !is_half(w) || w.rank() != 2 {
        bail!(
            "half_linear: expected a 2-D bf16 / f16 weight, got {:?} {:?}",
            w.dtype(),
            w.dims()
        );
    }
    let (out, inp) = w.dims2()?;
    if x.rank() == 0 || x.dim(D::Minus1)? != inp {
        bail!(
            "half_linear: input {:?} for a weight [{out}, {inp}]",
            x.dims()
        );
    }
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        bail!("half_linear: f32 or f64 input, got {:?}", x.dtype());
    }
    if let Some(b) = b
        && b.dims() != [out]
    {
        bail!(
            "half_linear: bias {:?} for a weight [{out}, {inp}]",
            b.dims()
        );
    }
    let supported = x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == DType::F32
        && x.elem_count() > 0
        && w.elem_count() > 0
        && w.layout().stride().iter().all(|&s| s != 0)
        && b.is_none_or(|b| b.device().is_cpu());
    if supported {
        let bias = match b {
            Some(b) => Some(b.detach().to_dtype(DType::F32)?.contiguous()?),
            None => None,
        };
        return x.contiguous()?.apply_op1(HalfLinear {
            w: w.detach(),
            bias,
        });
    }
    let wd = w.detach().to_dtype(x.dtype())?;
    let b = match b {
        Some(b) => Some(b.detach().to_dtype(x.dtype())?),
        None => None,
    };
    crate::ops::frozen_linear_reference(x, &wd, b.as_ref())
}

/// A half-precision weight's elements, whatever its dtype.
#[derive(Clone, Copy)]
enum HalfSlice<'a> {
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl HalfSlice<'_> {
    fn len(&self) -> usize {
        match self {
            HalfSlice::Bf16(s) => s.len(),
            HalfSlice::F16(s) => s.len(),
        }
    }

    /// Converts `src[at..at + dst.len()]` into `dst`.
    fn convert(&self, at: usize, dst: &mut [f32]) {
        let n = dst.len();
        match self {
            // bf16 is the top half of an f32: a shift, which the compiler vectorizes (half's slice conversion
            // goes element by element through its NaN handling, several times slower).
            HalfSlice::Bf16(s) => {
                for (d, &b) in dst.iter_mut().zip(s[at..at + n].reinterpret_cast()) {
                    *d = f32::from_bits((b as u32) << 16);
                }
            }
            HalfSlice::F16(s) => s[at..at + n].convert_to_f32_slice(dst),
        }
    }

    /// The element at `at`, as f32.
    fn get(&self, at: usize) -> f32 {
        match self {
            HalfSlice::Bf16(s) => s[at].to_f32(),
            HalfSlice::F16(s) => s[at].to_f32(),
        }
    }
}

/// The weight `[n, k]` as stored: its elements, start offset and strides.
struct HalfMatrix<'a> {
    data: HalfSlice<'a>,
    n: usize,
    k: usize,
    offset: usize,
    s0: usize,
    s1: usize,
}

impl<'a> HalfMatrix<'a> {
    fn new(storage: &'a CpuStorage, l: &Layout) -> Result<Self> {
        let data = match storage {
            CpuStorage::BF16(s) => HalfSlice::Bf16(s),
            CpuStorage::F16(s) => HalfSlice::F16(s),
            _ => bail!("peft-half-linear: the weight is not bf16 / f16"),
        };
        let (n, k) = l.shape().dims2()?;
        let (offset, s0, s1) = (l.start_offset(), l.stride()[0], l.stride()[1]);
        if n == 0 || k == 0 || offset + (n - 1) * s0 + (k - 1) * s1 >= data.len() {
            bail!("peft-half-linear: weight layout {l:?} is empty or exceeds its storage");
        }
        Ok(Self {
            data,
            n,
            k,
            offset,
            s0,
            s1,
        })
    }

    /// Rows per band.
    fn band_rows(&self) -> usize {
        half_linear_band_rows(self.n, self.k)
    }

    /// Converts rows `[r0, r0 + r)` into `buf` (`r · k` elements) and returns the buffer's strides `(row,
    /// column)`: row-major `[r, k]` for a row-major weight, `[k, r]` (strides `(1, r)`) for the transposed view
    /// [`crate::BaseLayer`] keeps, so that each copied run is contiguous in the source.
    fn band(&self, r0: usize, r: usize, buf: &mut [f32]) -> (usize, usize) {
        let k = self.k;
        let work = r * k;
        if self.s1 == 1 {
            par_rows(buf, k, work, |j0, rows| {
                for (dj, row) in rows.chunks_exact_mut(k).enumerate() {
                    self.data
                        .convert(self.offset + (r0 + j0 + dj) * self.s0, row);
                }
            });
            (k, 1)
        } else if self.s0 == 1 {
            par_rows(buf, r, work, |k0, rows| {
                for (dk, row) in rows.chunks_exact_mut(r).enumerate() {
                    self.data
                        .convert(self.offset + (k0 + dk) * self.s1 + r0, row);
                }
            });
            (1, r)
        } else {
            for j in 0..r {
                for kk in 0..k {
                    buf[j * k + kk] = self
                        .data
                        .get(self.offset + (r0 + j) * self.s0 + kk * self.s1);
                }
            }
            (k, 1)
        }
    }

    /// Calls `f(r0, r, band, (row_stride, col_stride))` for consecutive bands of rows converted to f32.
    fn for_each_band(&self, mut f: impl FnMut(usize, usize, &[f32], (usize, usize))) {
        let rows = self.band_rows();
        let mut buf = vec![0f32; rows * self.k];
        let mut r0 = 0;
        while r0 < self.n {
            let r = rows.min(self.n - r0);
            let strides = self.band(r0, r, &mut buf[..r * self.k]);
            f(r0, r, &buf[..r * self.k], strides);
            r0 += r;
        }
    }
}

/// Reads a tensor's CPU storage and layout for the duration of `f`.
fn with_cpu<R>(t: &Tensor, f: impl FnOnce(&CpuStorage, &Layout) -> Result<R>) -> Result<R> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => f(c, l),
        _ => bail!("peft-half-linear: a tensor is not on the CPU"),
    }
}

/// The forward op `x → x Wᵀ + b`; the frozen weight and bias ride in the op.
struct HalfLinear {
    w: Tensor,
    bias: Option<Tensor>,
}

impl CustomOp1 for HalfLinear {
    fn name(&self) -> &'static str {
        "peft-half-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(x) = s else {
            bail!("peft-half-linear: f32 input only");
        };
        let x = contiguous_part(x, l)?;
        let bias = match &self.bias {
            Some(b) => Some(with_cpu(b, |c, lb| match c {
                CpuStorage::F32(v) => Ok(contiguous_part(v, lb)?.to_vec()),
                _ => bail!("peft-half-linear: the bias is not f32"),
            })?),
            None => None,
        };
        let out = with_cpu(&self.w, |c, lw| {
            let w = HalfMatrix::new(c, lw)?;
            Ok(fwd(&w, x, bias.as_deref()))
        })?;
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("rank > 0") = self.w.dim(0)?;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let dx = grad
            .contiguous()?
            .apply_op1_no_bwd(&HalfLinearBwd { w: self.w.clone() })?;
        Ok(Some(dx))
    }
}

fn fwd(w: &HalfMatrix<'_>, x: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    let m = x.len() / k;
    if m <= FUSED_MAX_ROWS && (w.s0 == 1 || w.s1 == 1) {
        return fwd_fused(w, x, bias, m);
    }
    let mut out = match bias {
        Some(b) => b.repeat(m),
        None => vec![0f32; m * n],
    };
    w.for_each_band(|r0, r, buf, (bs0, bs1)| {
        // SAFETY: `x` holds m·k elements (row stride k), `buf` r·k, element (j, kk) of the band at
        // j·bs0 + kk·bs1, so the right-hand side bandᵀ `[k, r]` has row stride bs1 and column stride bs0;
        // the destination is the column block [r0, r0 + r) of `out` (m·n, row stride n).
        // out[:, r0..r0+r] (+)= x · bandᵀ.
        unsafe {
            gemm::gemm(
                m,
                r,
                k,
                out.as_mut_ptr().add(r0),
                1,
                n as isize,
                bias.is_some(),
                x.as_ptr(),
                1,
                k as isize,
                buf.as_ptr(),
                bs0 as isize,
                bs1 as isize,
                1f32,
                1f32,
                false,
                false,
                false,
                gemm_parallelism(),
            );
        }
    });
    out
}

/// Up to this many rows of `x` take [`fwd_fused`] (a decode step): each weight element is converted and used
/// once in one pass, where a band buffer and `gemm`'s packing would cost more than the product. Measured on
/// SmolLM2's shapes: 1.5–3× faster than the bands for one row, slower from a few rows on.
const FUSED_MAX_ROWS: usize = 1;

/// Columns of the output one [`fwd_fused`] block keeps in the L1 cache.
const FUSED_COLS: usize = 512;

/// Runs `f(start, end)` over `0..n` cut into contiguous ranges, on up to `get_num_threads()` scoped threads
/// (one when `work`, in weight elements, is small), and returns the results in order.
fn par_ranges<R: Send>(n: usize, work: usize, f: impl Fn(usize, usize) -> R + Sync) -> Vec<R> {
    let threads = candle_core::utils::get_num_threads()
        .min(work / (1 << 18))
        .min(n)
        .max(1);
    if threads == 1 {
        return vec![f(0, n)];
    }
    let per = n.div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = (1..threads)
            .map(|t| {
                let (a, b) = ((t * per).min(n), ((t + 1) * per).min(n));
                scope.spawn(move || f(a, b))
            })
            .collect();
        let mut out = vec![f(0, per.min(n))];
        out.extend(
            handles
                .into_iter()
                .map(|h| h.join().expect("a half-linear worker thread panicked")),
        );
        out
    })
}

/// `x Wᵀ (+ b)` for few rows of `x` without a band buffer: for the transposed view (`s0 == 1`, the layout
/// [`crate::BaseLayer`] keeps) an axpy over each stored row of `Wᵀ`; for a row-major weight (`s1 == 1`, a
/// tied `lm_head`) eight-lane dot products over each row of `W`. Output columns are split over threads.
fn fwd_fused(w: &HalfMatrix<'_>, x: &[f32], bias: Option<&[f32]>, m: usize) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    let blocks = par_ranges(n, n * k, |j0, j1| {
        let len = j1 - j0;
        // The block's output, row-major [m, len].
        let mut acc = vec![0f32; m * len];
        if let Some(b) = bias {
            for row in acc.chunks_exact_mut(len.max(1)) {
                row.copy_from_slice(&b[j0..j1]);
            }
        }
        let mut wbuf = vec![0f32; FUSED_COLS.min(if w.s0 == 1 { len } else { k })];
        if w.s0 == 1 {
            for c0 in (0..len).step_by(FUSED_COLS) {
                let c = FUSED_COLS.min(len - c0);
                let wb = &mut wbuf[..c];
                for kk in 0..k {
                    w.data.convert(w.offset + kk * w.s1 + j0 + c0, wb);
                    for i in 0..m {
                        let xv = x[i * k + kk];
                        let a = &mut acc[i * len + c0..i * len + c0 + c];
                        for (o, &wv) in a.iter_mut().zip(wb.iter()) {
                            *o += xv * wv;
                        }
                    }
                }
            }
        } else {
            let (mut lanes, mut tail) = (vec![[0f32; 8]; m], vec![0f32; m]);
            for j in j0..j1 {
                lanes.fill([0f32; 8]);
                tail.fill(0.0);
                for k0 in (0..k).step_by(FUSED_COLS) {
                    let c = FUSED_COLS.min(k - k0);
                    let wb = &mut wbuf[..c];
                    w.data.convert(w.offset + j * w.s0 + k0, wb);
                    for i in 0..m {
                        let xr = &x[i * k + k0..i * k + k0 + c];
                        let l = &mut lanes[i];
                        let (xc, wc) = (xr.chunks_exact(8), wb.chunks_exact(8));
                        let (xt, wt) = (xc.remainder(), wc.remainder());
                        for (xa, wa) in xc.zip(wc) {
                            for ((o, &a), &b) in l.iter_mut().zip(xa).zip(wa) {
                                *o += a * b;
                            }
                        }
                        for (a, b) in xt.iter().zip(wt) {
                            tail[i] += a * b;
                        }
                    }
                }
                for i in 0..m {
                    let sum: f32 = lanes[i].iter().sum::<f32>() + tail[i];
                    acc[i * len + (j - j0)] += sum;
                }
            }
        }
        acc
    });
    let mut out = vec![0f32; m * n];
    let mut j0 = 0;
    for block in blocks {
        let len = block.len() / m.max(1);
        for i in 0..m {
            out[i * n + j0..i * n + j0 + len].copy_from_slice(&block[i * len..(i + 1) * len]);
        }
        j0 += len;
    }
    out
}

/// The backward `g → g · W`, `[.., out] → [.., in]`.
struct HalfLinearBwd {
    w: Tensor,
}

impl CustomOp1 for HalfLinearBwd {
    fn name(&self) -> &'static str {
        "peft-half-linear-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(g) = s else {
            bail!("peft-half-linear-bwd: f32 gradient only");
        };
        let g = contiguous_part(g, l)?;
        let (n, k) = self.w.dims2()?;
        if l.dims().last() != Some(&n) {
            bail!(
                "peft-half-linear-bwd: g {:?}, w {:?}",
                l.dims(),
                self.w.dims()
            );
        }
        let out = with_cpu(&self.w, |c, lw| {
            let w = HalfMatrix::new(c, lw)?;
            Ok(bwd(&w, g))
        })?;
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("rank > 0") = k;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

fn bwd(w: &HalfMatrix<'_>, g: &[f32]) -> Vec<f32> {
    let (n, k) = (w.n, w.k);
    let m = g.len() / n;
    let mut out = vec![0f32; m * k];
    w.for_each_band(|r0, r, buf, (bs0, bs1)| {
        // SAFETY: `g` holds m·n elements (row stride n; the block starts at column r0), `buf` r·k with element
        // (j, kk) at j·bs0 + kk·bs1 (row stride bs0, column stride bs1), `out` m·k. out (+)= g[:, r0..r0+r] · band.
        unsafe {
            gemm::gemm(
                m,
                k,
                r,
                out.as_mut_ptr(),
                1,
                k as isize,
                r0 > 0,
                g.as_ptr().add(r0),
                1,
                n as isize,
                buf.as_ptr(),
                bs1 as isize,
                bs0 as isize,
                1f32,
                1f32,
                false,
                false,
                false,
                gemm_parallelism(),
            );
        }
    });
    out
}

/// The rows per band [`half_linear`] converts at once for a weight of `inp` columns (at least one, at most
/// `out`): for tests that need shapes crossing band edges.
///
/// ```
/// assert_eq!(peft::ops::half_linear_band_rows(10, 1 << 20), 1);
/// assert_eq!(peft::ops::half_linear_band_rows(10, 64), 10);
/// ```
pub fn half_linear_band_rows(out: usize, inp: usize) -> usize {
    (BAND_ELEMS / inp.max(1)).clamp(1, out.max(1))
}
