//! Each format against a plain dequantize-then-f32 reference: the decode must reproduce
//! candle's own dequantization, and the product must stay within the error that 8-bit
//! activations can introduce, a bound computed per product (not a fixed epsilon).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use super::kernels::{
    min_term, q4_dot_portable, q4_row, q8_dot_portable, q8_row, q8_row_min, Q8Acts,
};
use super::*;

const FORMATS: [GgmlDType; 8] = [
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q8_0,
    GgmlDType::Q4K,
    GgmlDType::Q6K,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q5K,
];

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Random weights quantized by candle, our unpacking of them, and candle's dequantization.
/// Each 32-element block gets its own magnitude and offset, so that the scales and mins of
/// the K formats spread over their whole 6-bit range (uniform data would leave them equal).
fn quantized(dtype: GgmlDType, n: usize, k: usize, seed: u64) -> (Unpacked, Vec<f32>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
    let mut values = random(n * k, seed);
    for block in values.chunks_mut(32) {
        let (scale, shift) = (
            rng.random_range(0.01f32..3.0),
            rng.random_range(-1.0f32..1.0),
        );
        block.iter_mut().for_each(|v| *v = *v * scale + shift);
    }
    let w = Tensor::from_vec(values, (n, k), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&w, dtype).unwrap();
    let bytes = q.data().unwrap();
    let ours = unpack::unpack(dtype, &bytes, n, k).unwrap();
    let reference = q
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (ours, reference)
}

fn pool(threads: usize) -> ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
}

#[test]
fn unpacking_reproduces_candles_dequantization() {
    for dtype in FORMATS {
        let (ours, reference) = quantized(dtype, 8, 512, 1);
        // Exact for the formats whose scales are f16 already. The K formats' scale products
        // are rounded to f16 (see `unpack`): `x = scale·q + min` may move by 2⁻¹¹ of
        // |scale·q| + |min|, which is at most three times the block's largest |x|.
        let exact = !matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K | GgmlDType::Q5K);
        let ours = ours.dequantize();
        for (block, (a, b)) in ours.chunks(32).zip(reference.chunks(32)).enumerate() {
            let largest = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (j, (a, b)) in a.iter().zip(b).enumerate() {
                let tolerance = if exact {
                    1e-6 * b.abs().max(1.0)
                } else {
                    3.0 * largest / 2048.0
                };
                assert!(
                    (a - b).abs() <= tolerance,
                    "{dtype:?} element {}: ours {a}, candle {b}",
                    block * 32 + j
                );
            }
        }
    }
}

#[test]
fn products_stay_within_the_activation_rounding_bound() {
    let (n, k) = (40, 512);
    for dtype in FORMATS {
        let (w, wf) = quantized(dtype, n, k, 2);
        let w = Packed::for_isa(w, Isa::best());
        for (rows, threads) in [(1, 1), (3, 2), (6, 2), (9, 1)] {
            let x = random(rows * k, 3 + rows as u64);
            let got = matmul(&w, &x, rows, &pool(threads));
            for t in 0..rows {
                let xr = &x[t * k..(t + 1) * k];
                for r in 0..n {
                    let wr = &wf[r * k..(r + 1) * k];
                    let exact: f64 = wr.iter().zip(xr).map(|(a, b)| *a as f64 * *b as f64).sum();
                    // Each activation moves by at most half a step, d/2 with d = max|x_block|
                    // / 127, plus the f16 rounding of d (2⁻¹¹·d) times |q| ≤ 127: 0.5625·d.
                    let bound: f64 = (0..k / 32)
                        .map(|b| {
                            let xs = &xr[b * 32..b * 32 + 32];
                            let d = xs.iter().fold(0.0f32, |m, v| m.max(v.abs())) / 127.0;
                            let step = 0.5625 * d;
                            let ws: f32 = wr[b * 32..b * 32 + 32].iter().map(|v| v.abs()).sum();
                            (step * ws) as f64
                        })
                        .sum();
                    let diff = (got[t * n + r] as f64 - exact).abs();
                    assert!(
                        diff <= bound * 1.001 + 1e-4,
                        "{dtype:?} rows {rows} token {t} row {r}: got {}, exact {exact}, bound {bound}",
                        got[t * n + r]
                    );
                }
            }
        }
    }
}

/// Products whose rows are quantized and multiplied by several threads (pieces of rows and
/// runs of weight rows taken by whichever thread is free, the last ones short) equal the
/// products of one thread, on every kernel.
#[test]
fn products_across_a_pool_equal_one_threads() {
    // Few rows (quantized before the section), pieces with a short last one, and more.
    for (rows, k) in [(4, 576), (7, 576), (13, 576), (17, 288), (64, 768)] {
        let (w, _) = quantized(GgmlDType::Q4_1, 200, k, rows as u64);
        let x = random(rows * k, rows as u64 + k as u64);
        let other = random(rows * k, 1 + rows as u64 + k as u64);
        for (name, isa, packed) in kernel_layouts(&w) {
            let one = matmul_parts_on(isa, std::slice::from_ref(&packed), &x, rows, &pool(1));
            // This thread's reused activation buffers hold another input's values, so a
            // piece of rows the section failed to quantize would show.
            drop(Q8Acts::quantize_on(isa, &other, rows, k));
            let three = matmul_parts_on(isa, std::slice::from_ref(&packed), &x, rows, &pool(3));
            assert_eq!(one, three, "{name} {rows}×{k}");
        }
    }
}

/// Activations reuse this thread's buffers from one product to the next, larger or smaller:
/// every value comes from the new input, none from the last one.
#[test]
fn reused_activation_buffers_hold_only_the_new_values() {
    for isa in [Isa::best(), Isa::Portable] {
        for (rows, k) in [(16, 1536), (3, 576), (16, 576), (1, 32), (9, 1536)] {
            let mut x = random(rows * k, (rows * k) as u64);
            if x.len() >= 4 * 32 {
                // A block of zeros (scale 0), one of tiny values, one with a lone large one.
                x[32..64].fill(0.0);
                x[64..96].iter_mut().for_each(|v| *v *= 1e-30);
                x[100] = -3e4;
            }
            let acts = Q8Acts::quantize_on(isa, &x, rows, k);
            assert_eq!(acts.qs().len(), rows * k);
            assert_eq!(
                (acts.d().len(), acts.gsum().len()),
                (rows * k / 32, rows * k / 16)
            );
            let mut q = [0i8; 32];
            for b in 0..rows * k / 32 {
                let (d, sum) = kernels::quantize_block_portable(&x[b * 32..b * 32 + 32], &mut q);
                let f16 = |x: f32| half::f16::from_f32(x).to_f32();
                assert_eq!(
                    &acts.qs()[b * 32..b * 32 + 32],
                    &q[..],
                    "{isa:?} {rows}×{k} block {b}"
                );
                assert_eq!((acts.d()[b], acts.dsum()[b]), (f16(d), f16(d * sum as f32)));
                let low: i32 = q[..16].iter().map(|&v| v as i32).sum();
                assert_eq!(
                    (acts.gsum()[2 * b], acts.gsum()[2 * b + 1]),
                    (low, sum - low)
                );
            }
        }
    }
}

#[test]
fn activation_quantization_simd_matches_portable() {
    let k = 768;
    let x = random(4 * k, 9);
    let acts = Q8Acts::quantize(&x, 4, k);
    let mut portable_qs = vec![0i8; 32];
    for b in 0..4 * k / 32 {
        let (d, sum) = kernels::quantize_block_portable(&x[b * 32..b * 32 + 32], &mut portable_qs);
        assert_eq!(
            &acts.qs()[b * 32..b * 32 + 32],
            &portable_qs[..],
            "block {b}"
        );
        let f16 = |x: f32| half::f16::from_f32(x).to_f32();
        assert_eq!(
            (acts.d()[b], acts.dsum()[b]),
            (f16(d), f16(d * sum as f32)),
            "block {b}"
        );
        let group_sum = |g: &[i8]| g.iter().map(|&q| q as i32).sum::<i32>();
        assert_eq!(
            (acts.gsum()[2 * b], acts.gsum()[2 * b + 1]),
            (group_sum(&portable_qs[..16]), group_sum(&portable_qs[16..])),
            "block {b}"
        );
    }
}

/// Every kernel set this CPU has, each on the layout it reads (AVX-512 VNNI: the tiled
/// kernels on panels; AVX-VNNI, AVX2: the row kernels), and the panels' portable code,
/// which every CPU runs.
fn kernel_layouts(w: &Unpacked) -> Vec<(String, Isa, Packed)> {
    let mut out: Vec<(String, Isa, Packed)> = Isa::ALL
        .into_iter()
        .filter(|i| i.available())
        .map(|isa| (format!("{isa:?}"), isa, Packed::for_isa(w.clone(), isa)))
        .collect();
    out.push((
        "portable panels".into(),
        Isa::Portable,
        Packed::Panels(Panels::from_rows(w)),
    ));
    out
}

/// Every kernel instruction set this CPU has (AVX-512 VNNI, AVX-VNNI, AVX2) against the
/// portable dot products, for every format, at widths that leave every kind of tail (fewer
/// than eight blocks after the 512-bit runs, a lone block, a K super-block) and token counts
/// that leave partial groups of eight and of four. A CPU without AVX-512 checks the others and says so.
#[test]
fn every_kernel_isa_agrees_with_portable_at_odd_sizes() {
    if !Isa::Avx512Vnni.available() {
        eprintln!("this CPU has no AVX-512 VNNI: its kernels were not checked here");
    }
    // 23 rows: two panels, the second part-filled; 60: a part-filled panel inside a decode
    // tile of four; 71: decode tiles, then a part-filled panel alone.
    for n in [23, 60, 71] {
        check_every_kernel_at_odd_sizes(n);
    }
}

fn check_every_kernel_at_odd_sizes(n: usize) {
    for k in [256, 512, 768, 32, 224, 288, 544, 576] {
        for dtype in FORMATS {
            if k % 256 != 0 && matches!(dtype, GgmlDType::Q4K | GgmlDType::Q6K | GgmlDType::Q5K) {
                continue; // the K formats come in 256-element super-blocks
            }
            let (w, _) = quantized(dtype, n, k, k as u64);
            let layouts = kernel_layouts(&w);
            for tokens in [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 35] {
                let x = random(tokens * k, 11 + tokens as u64);
                let acts = Q8Acts::quantize(&x, tokens, k);
                for (name, isa, packed) in &layouts {
                    let got =
                        matmul_parts_on(*isa, std::slice::from_ref(packed), &x, tokens, &pool(1));
                    for t in 0..tokens {
                        let row = super::kernels::ActRow {
                            qs: &acts.qs()[t * k..(t + 1) * k],
                            d: &acts.d()[t * k / 32..(t + 1) * k / 32],
                            dsum: &acts.dsum()[t * k / 32..(t + 1) * k / 32],
                        };
                        for r in 0..n {
                            let portable = match &w {
                                Unpacked::Q4(m) => {
                                    let (qs, s, mn) = q4_row(m, r);
                                    q4_dot_portable(qs, s, mn, row)
                                }
                                Unpacked::Q8(m) => {
                                    let (qs, s) = q8_row(m, r);
                                    q8_dot_portable(qs, s, row) + min_term(q8_row_min(m, r), row)
                                }
                            };
                            let v = got[t * n + r];
                            assert!(
                                (v - portable).abs() <= 1e-4 * portable.abs().max(1.0),
                                "{name} {dtype:?} n {n} k {k} tokens {tokens} token {t} row {r}: {v} vs portable {portable}"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn stacked_matrices_give_side_by_side_outputs() {
    let k = 256;
    let (a, _) = quantized(GgmlDType::Q4_1, 8, k, 5);
    let (b, _) = quantized(GgmlDType::Q4_1, 4, k, 6);
    let x = random(2 * k, 7);
    let p = pool(2);
    let packed = |w: &Unpacked| Packed::for_isa(w.clone(), Isa::best());
    let (ya, yb) = (
        matmul(&packed(&a), &x, 2, &p),
        matmul(&packed(&b), &x, 2, &p),
    );
    let stacked = Unpacked::stack(vec![a, b]).unwrap();
    let y = matmul(&packed(&stacked), &x, 2, &p);
    for t in 0..2 {
        assert_eq!(&y[t * 12..t * 12 + 8], &ya[t * 8..t * 8 + 8]);
        assert_eq!(&y[t * 12 + 8..t * 12 + 12], &yb[t * 4..t * 4 + 4]);
    }
    let (c, _) = quantized(GgmlDType::Q8_0, 4, k, 8);
    assert!(Unpacked::stack(vec![stacked, c]).is_err());
}

/// A Q4_K_M file stores Q and K as Q4_K and V as Q6_K (and a Q5_K_M file mixes Q5_K with
/// Q6_K): side by side they run as separate parts, with one quantization of the input.
#[test]
fn side_by_side_parts_of_different_layouts_give_each_ones_output() {
    let k = 512;
    let p = pool(2);
    let x = random(5 * k, 11);
    // Work enough (384 rows × 512 × 5 tokens) that the pool splits the rows into runs that
    // cross the parts' boundaries.
    let formats = [
        (GgmlDType::Q4K, 96),
        (GgmlDType::Q4K, 32),
        (GgmlDType::Q6K, 32),
        (GgmlDType::Q5K, 64),
        (GgmlDType::Q8_0, 160),
    ];
    let parts: Vec<Unpacked> = formats
        .iter()
        .enumerate()
        .map(|(i, &(f, n))| quantized(f, n, k, 20 + i as u64).0)
        .collect();
    let packed = |w: Unpacked| Packed::for_isa(w, Isa::best());
    let alone: Vec<Vec<f32>> = parts
        .iter()
        .map(|w| matmul(&packed(w.clone()), &x, 5, &p))
        .collect();
    let runs: Vec<Packed> = Unpacked::stack_runs(parts)
        .unwrap()
        .into_iter()
        .map(packed)
        .collect();
    // Q4_K+Q4_K stack; Q6_K, Q5_K and Q8_0 share the 8-bit layout (Q6_K has no min, Q5_K has).
    assert_eq!(runs.len(), 2);
    let n: usize = formats.iter().map(|f| f.1).sum();
    let y = super::matmul_parts(&runs, &x, 5, &p);
    for t in 0..5 {
        let mut col = 0;
        for (i, &(f, rows)) in formats.iter().enumerate() {
            let got = &y[t * n + col..t * n + col + rows];
            let want = &alone[i][t * rows..(t + 1) * rows];
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "{f:?} token {t}: {g} vs {w}"
                );
            }
            col += rows;
        }
    }
}

#[test]
fn malformed_input_is_refused() {
    assert!(matches!(
        unpack::unpack(GgmlDType::Q2K, &[0; 84], 1, 256),
        Err(QuantError::Format(_))
    ));
    assert!(matches!(
        unpack::unpack(GgmlDType::Q4_1, &[0; 19], 1, 32),
        Err(QuantError::Shape(_))
    ));
}

/// `w` × `x` (`tokens` rows) on every kernel set this CPU has equals the portable rows' product.
fn assert_every_kernel_set_gives_the_portable_sums(w: &Unpacked, x: &[f32], tokens: usize) {
    let want = matmul_parts_on(
        Isa::Portable,
        &[Packed::Rows(w.clone())],
        x,
        tokens,
        &pool(1),
    );
    for (name, isa, packed) in kernel_layouts(w) {
        let got = matmul_parts_on(isa, std::slice::from_ref(&packed), x, tokens, &pool(1));
        for (i, (g, p)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - p).abs() <= 1e-4 * p.abs().max(1.0),
                "{name} tokens {tokens} output {i}: {g} vs portable {p}"
            );
        }
    }
}

/// 8-bit weights at the ends of their range (−128 and 127, which a Q8_0 file may hold though
/// candle's quantizer never writes −128) against activations at ±127: every kernel set gives
/// the portable sums, so neither the sign transfer nor a 16-bit pair step overflows.
#[test]
fn extreme_eight_bit_weights_give_the_portable_sums_on_every_kernel_set() {
    let (n, k) = (9, 576);
    let mut m = Q8Matrix::zeros(n, k);
    for (i, q) in m.qs.iter_mut().enumerate() {
        *q = match i % 5 {
            0 | 3 => -128,
            1 => 127,
            2 => -127,
            _ => (i % 256) as u8 as i8,
        };
    }
    m.scale
        .iter_mut()
        .enumerate()
        .for_each(|(i, s)| *s = half::f16::from_f32(0.01 + (i % 7) as f32 * 0.003));
    let w = Unpacked::Q8(m);
    for tokens in [1, 3, 8, 9] {
        // Activations whose blocks quantize to ±127 at their extremes.
        let x: Vec<f32> = (0..tokens * k)
            .map(|i| {
                if i % 3 == 0 {
                    1.0
                } else if i % 3 == 1 {
                    -1.0
                } else {
                    0.25
                }
            })
            .collect();
        assert_every_kernel_set_gives_the_portable_sums(&w, &x, tokens);
    }
}

/// 4-bit weights at the top of their range (15) against activations at ±127, one sign a
/// block: where the AVX2 kernel's 16-bit sums of a whole block come closest to 2¹⁵
/// (8 · 2 · 15 · 127 = 30,480). Every kernel set gives the portable sums.
#[test]
fn extreme_four_bit_weights_give_the_portable_sums_on_every_kernel_set() {
    // 71 rows: decode tiles of four panels, then a part-filled panel alone.
    let (n, k) = (71, 576);
    let mut m = Q4Matrix::zeros(n, k);
    m.qs.fill(0xFF);
    for (i, (s, mn)) in m.scale.iter_mut().zip(m.min.iter_mut()).enumerate() {
        *s = half::f16::from_f32(0.01 + (i % 7) as f32 * 0.003);
        *mn = half::f16::from_f32(-0.05 * (i % 3) as f32);
    }
    let w = Unpacked::Q4(m);
    for tokens in [1, 3, 4, 8, 16, 17] {
        let x: Vec<f32> = (0..tokens * k)
            .map(|i| if (i / 32) % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        assert_every_kernel_set_gives_the_portable_sums(&w, &x, tokens);
    }
}

/// Two threads whose runs of rows cut panels: parts of 24 and 40 rows side by side (the
/// second part's panels start at row 24 of the product), wide enough that the pool splits
/// the product. Each panel cut by a run is computed by both tasks, each storing only its
/// own rows: the result must equal the parts computed alone.
#[test]
fn runs_that_cut_panels_store_each_row_once() {
    let k = 4096;
    let (a, _) = quantized(GgmlDType::Q4_1, 24, k, 31);
    let (b, _) = quantized(GgmlDType::Q8_0, 40, k, 32);
    let x = random(3 * k, 33);
    let p = pool(2);
    for (name, isa, _) in kernel_layouts(&a) {
        let pack = |w: &Unpacked| match isa {
            Isa::Portable if name == "portable panels" => Packed::Panels(Panels::from_rows(w)),
            _ => Packed::for_isa(w.clone(), isa),
        };
        let (pa, pb) = (pack(&a), pack(&b));
        let want_a = matmul_parts_on(isa, std::slice::from_ref(&pa), &x, 3, &pool(1));
        let want_b = matmul_parts_on(isa, std::slice::from_ref(&pb), &x, 3, &pool(1));
        let y = matmul_parts_on(isa, &[pa, pb], &x, 3, &p);
        for t in 0..3 {
            assert_eq!(
                &y[t * 64..t * 64 + 24],
                &want_a[t * 24..(t + 1) * 24],
                "{name}"
            );
            assert_eq!(
                &y[t * 64 + 24..(t + 1) * 64],
                &want_b[t * 40..(t + 1) * 40],
                "{name}"
            );
        }
    }
}
