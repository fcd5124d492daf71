//! Every op against the f64 reference, on every backend, at awkward shapes (1, primes, sizes
//! that are not multiples of a tile or of the vector width), with seeded inputs and poisoned
//! outputs. Backward ops are also checked against finite differences. The CUDA variants run
//! where a GPU is present and print "skipped: no CUDA device" where not.

use tessera::check::{assert_close, finite_diff, inputs, POISON};
use tessera::ops::transformer::LAYERNORM_EPS;
use tessera::reference as r;
use tessera::{Activation, AdamW, Backend, Error, Gemm, GemmKernel, Ops, Sgd};

fn up<B: Backend>(d: &B, x: &[f32]) -> B::Buf<f32> {
    d.upload(x).unwrap()
}
fn poisoned<B: Backend>(d: &B, n: usize) -> B::Buf<f32> {
    d.upload(&vec![POISON; n]).unwrap()
}
fn down<B: Backend>(d: &B, b: &B::Buf<f32>) -> Vec<f32> {
    d.download(&B::view(b)).unwrap()
}
fn f64s(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| v as f64).collect()
}

/// Lengths for elementwise ops: 1, primes, around the float4 and block widths, and one large.
const LENS: [usize; 9] = [1, 2, 3, 5, 7, 255, 1024, 1031, 70_001];

fn gemm_shapes_and_transposes<B: Ops>(d: &B) {
    let shapes = [
        (1, 1, 1),
        (1, 7, 3),
        (5, 1, 9),
        (13, 17, 1),
        (31, 37, 41),
        (64, 64, 64),
        (129, 130, 67),
        (3, 200, 5),
        (257, 19, 33),
    ];
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let g = Gemm::new(m, n, k).trans_a(ta).trans_b(tb);
            let a = inputs(i as u64 * 10 + 1, m * k, 1.0);
            let b = inputs(i as u64 * 10 + 2, k * n, 1.0);
            let (ab, bb) = (up(d, &a), up(d, &b));
            let mut c = poisoned(d, m * n);
            d.gemm(&g, &B::view(&ab), &B::view(&bb), None, &mut B::view_mut(&mut c), None).unwrap();
            let (want, _) = r::gemm(&g, &a, &b, None, &[]);
            assert_close(&format!("{} gemm {m}x{n}x{k} ta={ta} tb={tb}", d.name()), &down(d, &c), &want, 1e-4, 1e-4);
        }
    }
}

/// Every CUDA kernel family (`GemmKernel`) on shapes that cover edge tiles, k not a multiple of
/// any BK, operands too short or misaligned for vector loads, and the fused epilogue: against
/// the reference, and equal to the default family's result (each output is summed over k in the
/// same order in every family).
fn gemm_every_kernel<B: Ops>(d: &B) {
    // Even indices run at offset 0 (vector copies where the layout allows: (128, 64, 48) gives
    // A's and B's 16-byte paths in every layout); (65, 33, 0) is k = 0.
    let shapes = [(1, 1, 1), (3, 5, 20), (129, 130, 67), (64, 200, 40), (257, 19, 33), (65, 33, 0), (128, 64, 48)];
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            let seed = 1000 + i as u64 * 10;
            let a = inputs(seed + 1, m * k + 1, 1.0);
            let b = inputs(seed + 2, k * n, 1.0);
            let bias = inputs(seed + 3, n, 1.0);
            let c0 = inputs(seed + 4, m * n, 1.0);
            // A starts one element into its buffer on odd shapes: not 16-byte aligned.
            let off = i % 2;
            let (ab, bb, biasb) = (up(d, &a), up(d, &b), up(d, &bias));
            let g0 = Gemm::new(m, n, k).trans_a(ta).trans_b(tb).alpha(0.5).beta(0.25).activation(Activation::Relu);
            // Every family but split-K (and Auto, which may choose it) gives the same bits.
            let mut first: Option<Vec<f32>> = None;
            for kernel in GemmKernel::ALL {
                let g = g0.kernel(kernel);
                let mut c = up(d, &c0);
                let av = B::view_range(&ab, off..off + m * k);
                d.gemm(&g, &av, &B::view(&bb), Some(&B::view(&biasb)), &mut B::view_mut(&mut c), None).unwrap();
                let got = down(d, &c);
                let (_, want) = r::gemm(&g, &a[off..off + m * k], &b, Some(&bias), &c0);
                let name = format!("{} gemm {} {m}x{n}x{k} ta={ta} tb={tb} offset {off}", d.name(), kernel.name());
                assert_close(&name, &got, &want, 1e-4, 1e-4);
                if matches!(kernel, GemmKernel::Auto | GemmKernel::SplitK) {
                    continue;
                }
                match &first {
                    None => first = Some(got),
                    Some(f) => assert!(f == &got, "{name}: differs from the tiled kernel's result"),
                }
            }
        }
    }
}

/// Split-K at explicit chunk counts: uneven last chunks, more chunks than k-tiles, k = 0, every
/// transpose, the epilogue (beta, bias, activation into a separate output), views at odd
/// offsets; against the reference, and the same bits on a second run (a fixed summation order).
fn gemm_split_k<B: Ops>(d: &B) {
    let shapes = [(1, 1, 40), (70, 33, 100), (64, 64, 256), (129, 65, 67), (5, 200, 300), (33, 17, 0)];
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for splits in [2, 3, 100] {
                let seed = 5000 + i as u64 * 10;
                let a = inputs(seed + 1, m * k + 1, 1.0);
                let b = inputs(seed + 2, k * n, 1.0);
                let bias = inputs(seed + 3, n, 1.0);
                let c0 = inputs(seed + 4, m * n, 1.0);
                let off = i % 2;
                let (ab, bb, biasb) = (up(d, &a), up(d, &b), up(d, &bias));
                let g = Gemm::new(m, n, k)
                    .trans_a(ta)
                    .trans_b(tb)
                    .alpha(0.75)
                    .beta(if splits % 2 == 0 { 0.5 } else { 0.0 })
                    .activation(Activation::GeluTanh)
                    .split_k(splits);
                let run = || {
                    let mut c = up(d, &c0);
                    let mut y = up(d, &vec![f32::NAN; m * n]);
                    let av = B::view_range(&ab, off..off + m * k);
                    d.gemm(
                        &g,
                        &av,
                        &B::view(&bb),
                        Some(&B::view(&biasb)),
                        &mut B::view_mut(&mut c),
                        Some(&mut B::view_mut(&mut y)),
                    )
                    .unwrap();
                    (down(d, &c), down(d, &y))
                };
                let (pre, post) = run();
                let (want_pre, want_post) = r::gemm(&g, &a[off..off + m * k], &b, Some(&bias), &c0);
                let name = format!("{} split-K {splits} gemm {m}x{n}x{k} ta={ta} tb={tb}", d.name());
                assert_close(&format!("{name} pre-activation"), &pre, &want_pre, 1e-4, 1e-4);
                assert_close(&format!("{name} activation"), &post, &want_post, 1e-4, 1e-4);
                assert!(run() == (pre, post), "{name}: a second run gave other bits");
            }
        }
    }
}

/// Seeded token ids in `0..vocab`, as the f32 whole numbers a model's input holds.
fn token_ids(seed: u64, n: usize, vocab: usize) -> Vec<f32> {
    inputs(seed, n, 1.0).iter().map(|&u| (((u + 1.0) * 0.5 * vocab as f32) as usize).min(vocab - 1) as f32).collect()
}

/// Token + position embedding and its backward (a deterministic scatter into the tables, with
/// and without accumulation) against the reference, repeated runs giving the same bits; an id
/// outside the vocabulary refused on the CPU and a NaN row on a GPU.
fn embedding<B: Ops>(d: &B) {
    // (sequences, t, c, vocab, positions in the table): one row; a prime width; c above a
    // block of channels; many rows sharing few tokens; a table longer than t.
    for (i, &(bs, t, c, vocab, tmax)) in
        [(1, 1, 1, 1, 1), (2, 3, 5, 7, 3), (3, 8, 300, 65, 10), (12, 64, 128, 65, 64), (2, 5, 33, 1000, 9)]
            .iter()
            .enumerate()
    {
        let rows = bs * t;
        let seed = 7000 + i as u64 * 10;
        let ids = token_ids(seed, rows, vocab);
        let (wte, wpe) = (inputs(seed + 1, vocab * c, 1.0), inputs(seed + 2, tmax * c, 1.0));
        let (ib, wteb, wpeb) = (up(d, &ids), up(d, &wte), up(d, &wpe));
        let mut out = poisoned(d, rows * c);
        d.embed_forward(t, c, &B::view(&ib), &B::view(&wteb), &B::view(&wpeb), &mut B::view_mut(&mut out)).unwrap();
        let name = format!("{} embedding {bs}x{t}x{c} vocab {vocab}", d.name());
        assert_close(&format!("{name} forward"), &down(d, &out), &r::embed(t, c, &ids, &wte, &wpe), 1e-6, 1e-6);
        let dout = inputs(seed + 3, rows * c, 1.0);
        let dob = up(d, &dout);
        for keep in [(0.0f32, 0.0f32), (0.5, 0.0), (0.0, 1.0), (1.0, 0.5)] {
            let (g0, p0) = (inputs(seed + 4, vocab * c, 1.0), inputs(seed + 5, tmax * c, 1.0));
            let run = || {
                let (mut gw, mut gp) = (up(d, &g0), up(d, &p0));
                // Not read where the keep is 0: poison the part the backward writes.
                if keep.0 == 0.0 {
                    gw = poisoned(d, vocab * c);
                }
                if keep.1 == 0.0 {
                    d.write(&mut B::view_range_mut(&mut gp, 0..t * c), &vec![tessera::check::POISON; t * c]).unwrap();
                }
                d.embed_backward(
                    t,
                    c,
                    &B::view(&ib),
                    &B::view(&dob),
                    keep,
                    &mut B::view_mut(&mut gw),
                    &mut B::view_mut(&mut gp),
                )
                .unwrap();
                (down(d, &gw), down(d, &gp))
            };
            let (gw, gp) = run();
            let (ww, wp) = r::embed_backward(t, c, &ids, &dout, keep, &g0, &p0);
            assert_close(&format!("{name} dwte keep {keep:?}"), &gw, &ww, 1e-5, 1e-5);
            assert_close(&format!("{name} dwpe keep {keep:?}"), &gp, &wp, 1e-5, 1e-5);
            assert!(run() == (gw, gp), "{name}: a second backward gave other bits");
        }
        // Vocabulary-parallel parts (uneven: chunks of the vocabulary over 3 ranks), positions
        // on the first: the parts' outputs sum to the whole embedding, bit for bit, and each
        // part's table gradient is its rows of the whole one.
        let whole = down(d, &out);
        let (mut gw_whole, mut gp_whole) = (poisoned(d, vocab * c), poisoned(d, tmax * c));
        d.embed_backward(
            t,
            c,
            &B::view(&ib),
            &B::view(&dob),
            (0.0, 0.0),
            &mut B::view_mut(&mut gw_whole),
            &mut B::view_mut(&mut gp_whole),
        )
        .unwrap();
        let (gw_whole, gp_whole) = (down(d, &gw_whole), down(d, &gp_whole));
        let mut sum = vec![0f32; rows * c];
        for (k, part_rows) in tessera::parallel::comm::chunks(vocab, 3).into_iter().enumerate() {
            let part = tessera::ops::transformer::VocabPart { first: part_rows.start, vocab, positions: k == 0 };
            let wb = up(d, &wte[part_rows.start * c..part_rows.end * c]);
            let mut o = poisoned(d, rows * c);
            d.embed_forward_part(t, c, part, &B::view(&ib), &B::view(&wb), &B::view(&wpeb), &mut B::view_mut(&mut o))
                .unwrap();
            sum.iter_mut().zip(down(d, &o)).for_each(|(s, v)| *s += v);
            let (mut gw, mut gp) = (poisoned(d, part_rows.len() * c), poisoned(d, tmax * c));
            d.embed_backward_part(
                t,
                c,
                part,
                &B::view(&ib),
                &B::view(&dob),
                (0.0, 0.0),
                &mut B::view_mut(&mut gw),
                &mut B::view_mut(&mut gp),
            )
            .unwrap();
            assert!(down(d, &gw) == gw_whole[part_rows.start * c..part_rows.end * c], "{name}: part {k}'s dwte");
            assert!(down(d, &gp)[..t * c] == gp_whole[..t * c], "{name}: part {k}'s dwpe");
        }
        assert!(sum == whole, "{name}: the parts sum to the whole embedding");
    }
    // Bad ids: out of range, negative, not whole.
    let (t, c, vocab) = (2, 4, 5);
    let (wte, wpe) = (up(d, &inputs(1, vocab * c, 1.0)), up(d, &inputs(2, t * c, 1.0)));
    for bad in [5.0f32, -1.0, 2.5] {
        let ids = up(d, &[1.0, bad, 0.0, 4.0]);
        let mut out = poisoned(d, 4 * c);
        let r = d.embed_forward(t, c, &B::view(&ids), &B::view(&wte), &B::view(&wpe), &mut B::view_mut(&mut out));
        if d.name().starts_with("cpu") {
            let e = r.unwrap_err().to_string();
            assert!(e.contains(&format!("token id {bad} at position 1")) && e.contains("0..5"), "{e}");
        } else {
            r.unwrap();
            let got = down(d, &out);
            assert!(got[c..2 * c].iter().all(|v| v.is_nan()), "{}: id {bad} must give a NaN row: {got:?}", d.name());
            assert!(got[..c].iter().chain(&got[2 * c..]).all(|v| v.is_finite()), "{got:?}");
        }
    }
    // Shapes that do not fit.
    let ids = up(d, &[0.0; 5]);
    let mut out = poisoned(d, 5 * c);
    let e = d.embed_forward(2, c, &B::view(&ids), &B::view(&wte), &B::view(&wpe), &mut B::view_mut(&mut out));
    assert!(e.unwrap_err().to_string().contains("not a whole number of sequences of 2"));
    let ids = up(d, &[0.0; 6]);
    let mut out = poisoned(d, 6 * c);
    let e = d.embed_forward(3, c, &B::view(&ids), &B::view(&wte), &B::view(&wpe), &mut B::view_mut(&mut out));
    assert!(e.unwrap_err().to_string().contains("3 positions of 4 need at least 12"));
}

/// LayerNorm forward and backward against the reference, at widths from 1 to above a warp's
/// stride and on rows whose mean dwarfs their spread (where a one-pass sum of squares loses
/// every digit); the parameters' gradients accumulated or not; the same bits twice.
fn layernorm<B: Ops>(d: &B) {
    for (i, &(rows, c, offset)) in
        [(1, 1, 0.0f32), (3, 7, 0.0), (17, 32, 0.5), (5, 129, 0.0), (40, 1000, 0.0), (9, 64, 1000.0)].iter().enumerate()
    {
        let seed = 8000 + i as u64 * 10;
        let x: Vec<f32> = inputs(seed, rows * c, 1.0).iter().map(|v| v + offset).collect();
        let gamma: Vec<f32> = inputs(seed + 1, c, 0.5).iter().map(|v| v + 1.0).collect();
        let beta = inputs(seed + 2, c, 0.5);
        let (xb, gb, bb) = (up(d, &x), up(d, &gamma), up(d, &beta));
        let (mut y, mut mean, mut rstd) = (poisoned(d, rows * c), poisoned(d, rows), poisoned(d, rows));
        d.layernorm_forward(
            c,
            LAYERNORM_EPS,
            &B::view(&xb),
            &B::view(&gb),
            &B::view(&bb),
            &mut B::view_mut(&mut y),
            &mut B::view_mut(&mut mean),
            &mut B::view_mut(&mut rstd),
        )
        .unwrap();
        let name = format!("{} layernorm {rows}x{c} offset {offset}", d.name());
        let (wy, wm, wr) = r::layernorm(c, LAYERNORM_EPS, &x, &gamma, &beta);
        // Rows of width 1 have variance 0: y = beta, exactly.
        let tol = if offset > 100.0 { 2e-3 } else { 1e-4 };
        assert_close(&format!("{name} y"), &down(d, &y), &wy, tol, tol);
        assert_close(&format!("{name} mean"), &down(d, &mean), &wm, 1e-5, 1e-6);
        assert_close(&format!("{name} rstd"), &down(d, &rstd), &wr, tol, tol);
        let dy = inputs(seed + 3, rows * c, 1.0);
        let dyb = up(d, &dy);
        for keep in [0.0f32, 1.0] {
            let (g0, b0) = (inputs(seed + 4, c, 1.0), inputs(seed + 5, c, 1.0));
            let run = || {
                let mut dx = poisoned(d, rows * c);
                let (mut dg, mut db) =
                    if keep == 0.0 { (poisoned(d, c), poisoned(d, c)) } else { (up(d, &g0), up(d, &b0)) };
                d.layernorm_backward(
                    c,
                    &B::view(&xb),
                    &B::view(&dyb),
                    &B::view(&gb),
                    &B::view(&mean),
                    &B::view(&rstd),
                    &mut B::view_mut(&mut dx),
                    keep,
                    &mut B::view_mut(&mut dg),
                    &mut B::view_mut(&mut db),
                )
                .unwrap();
                (down(d, &dx), down(d, &dg), down(d, &db))
            };
            let (dx, dg, db) = run();
            let (wdx, wdg, wdb) = r::layernorm_backward(c, LAYERNORM_EPS, &x, &dy, &gamma, keep, &g0, &b0);
            let tol = if offset > 100.0 { 5e-3 } else { 1e-3 };
            assert_close(&format!("{name} dx keep {keep}"), &dx, &wdx, tol, tol);
            assert_close(&format!("{name} dgamma keep {keep}"), &dg, &wdg, tol, tol);
            assert_close(&format!("{name} dbeta keep {keep}"), &db, &wdb, 1e-4, 1e-4);
            assert!(run() == (dx, dg, db), "{name}: a second backward gave other bits");
        }
    }
    // Mismatched shapes are refused.
    let (x, g) = (up(d, &[1.0; 6]), up(d, &[1.0; 4]));
    let (mut y, mut m, mut s) = (poisoned(d, 6), poisoned(d, 2), poisoned(d, 2));
    let e = d
        .layernorm_forward(
            4,
            1e-5,
            &B::view(&x),
            &B::view(&g),
            &B::view(&g),
            &mut B::view_mut(&mut y),
            &mut B::view_mut(&mut m),
            &mut B::view_mut(&mut s),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("6 values are not rows of 4"), "{e}");
}

/// Causal multi-head attention, fused, against the unfused f64 reference: head sizes from 1 to
/// above a warp (and not powers of two), t of 1 and t not a multiple of anything, one and several
/// heads and sequences, large scores (the online softmax's rescaling); the backward too, the same
/// bits twice; shapes that do not fit refused.
fn attention<B: Ops>(d: &B) {
    // (sequences, t, heads, head size, input scale)
    for (i, &(bs, t, heads, hd, scale)) in [
        (1, 1, 1, 1, 1.0f32),
        (2, 5, 1, 3, 1.0),
        (1, 9, 3, 7, 1.0),
        (2, 7, 2, 40, 1.0),
        (1, 33, 4, 8, 1.0),
        (1, 6, 2, 16, 8.0),
    ]
    .iter()
    .enumerate()
    {
        let c = heads * hd;
        let rows = bs * t;
        let seed = 9000 + i as u64 * 10;
        let qkv = inputs(seed, rows * 3 * c, scale);
        let qb = up(d, &qkv);
        let (mut out, mut lse) = (poisoned(d, rows * c), poisoned(d, rows * heads));
        d.attention_forward(t, c, heads, &B::view(&qb), &mut B::view_mut(&mut out), &mut B::view_mut(&mut lse))
            .unwrap();
        let name = format!("{} attention {bs}x{t} heads {heads}x{hd} scale {scale}", d.name());
        let (want, _) = r::attention(t, c, heads, &qkv);
        let o = down(d, &out);
        assert_close(&format!("{name} forward"), &o, &want, 1e-5, 1e-4);
        let dout = inputs(seed + 1, rows * c, 1.0);
        let gb = up(d, &dout);
        let run = || {
            let (mut dq, mut ds) = (poisoned(d, rows * 3 * c), poisoned(d, rows * heads));
            d.attention_backward(
                t,
                c,
                heads,
                &B::view(&qb),
                &B::view(&out),
                &B::view(&gb),
                &B::view(&lse),
                &mut B::view_mut(&mut dq),
                &mut B::view_mut(&mut ds),
            )
            .unwrap();
            down(d, &dq)
        };
        let got = run();
        assert_close(&format!("{name} backward"), &got, &r::attention_backward(t, c, heads, &qkv, &dout), 1e-4, 1e-3);
        assert!(run() == got, "{name}: a second backward gave other bits");
    }
    let qkv = up(d, &[0.0; 2 * 3 * 6]);
    let (mut out, mut lse) = (poisoned(d, 12), poisoned(d, 8));
    let e = d.attention_forward(2, 6, 4, &B::view(&qkv), &mut B::view_mut(&mut out), &mut B::view_mut(&mut lse));
    assert!(e.unwrap_err().to_string().contains("width 6 must split into 4 heads"));
    let (mut out, mut lse) = (poisoned(d, 12), poisoned(d, 3));
    let e = d.attention_forward(2, 6, 1, &B::view(&qkv), &mut B::view_mut(&mut out), &mut B::view_mut(&mut lse));
    assert!(e.unwrap_err().to_string().contains("lse"));
    let (big, mut out, mut lse) = (up(d, &vec![0.0; 3 * 300]), poisoned(d, 300), poisoned(d, 1));
    let e = d.attention_forward(1, 300, 1, &B::view(&big), &mut B::view_mut(&mut out), &mut B::view_mut(&mut lse));
    assert!(e.unwrap_err().to_string().contains("at most 256"));
}

/// The unfused reference attention's backward is its derivative (finite differences of
/// `sum(w * out)` in every input).
#[test]
fn attention_reference_matches_finite_differences() {
    let (t, c, heads) = (4, 6, 2);
    let qkv = inputs(3, 2 * t * 3 * c, 1.0);
    let w = inputs(4, 2 * t * c, 1.0);
    let grad = r::attention_backward(t, c, heads, &qkv, &w);
    let x = f64s(&qkv);
    let loss = |v: &[f64]| {
        let f: Vec<f32> = v.iter().map(|&u| u as f32).collect();
        r::attention(t, c, heads, &f).0.iter().zip(&w).map(|(o, w)| o * *w as f64).sum::<f64>()
    };
    for (i, want) in grad.iter().enumerate() {
        let fd = finite_diff(loss, &x, i, 1e-3);
        assert!((fd - want).abs() < 2e-3, "dqkv[{i}]: {fd} vs {want}");
    }
}

/// The reference LayerNorm backward is the derivative of the reference forward (finite
/// differences of `sum(w * y)` in x, gamma and beta).
#[test]
fn layernorm_reference_matches_finite_differences() {
    let (rows, c) = (3, 6);
    let x = inputs(1, rows * c, 1.0);
    let gamma = inputs(2, c, 1.0);
    let beta = inputs(3, c, 1.0);
    let w = inputs(4, rows * c, 1.0);
    let (dx, dg, db) = r::layernorm_backward(c, LAYERNORM_EPS, &x, &w, &gamma, 0.0, &[0.0; 6], &[0.0; 6]);
    let loss = |x: &[f64], g: &[f64], b: &[f64]| {
        let f = |v: &[f64]| v.iter().map(|&u| u as f32).collect::<Vec<f32>>();
        let (y, _, _) = r::layernorm(c, LAYERNORM_EPS, &f(x), &f(g), &f(b));
        y.iter().zip(&w).map(|(y, w)| y * *w as f64).sum::<f64>()
    };
    let (xd, gd, bd) = (f64s(&x), f64s(&gamma), f64s(&beta));
    for (i, want) in dx.iter().enumerate() {
        let fd = finite_diff(|v| loss(v, &gd, &bd), &xd, i, 1e-3);
        assert!((fd - want).abs() < 2e-3, "dx[{i}]: {fd} vs {want}");
    }
    for j in 0..c {
        let fd = finite_diff(|v| loss(&xd, v, &bd), &gd, j, 1e-3);
        assert!((fd - dg[j]).abs() < 2e-3, "dgamma[{j}]: {fd} vs {}", dg[j]);
        let fd = finite_diff(|v| loss(&xd, &gd, v), &bd, j, 1e-3);
        assert!((fd - db[j]).abs() < 2e-3, "dbeta[{j}]: {fd} vs {}", db[j]);
    }
}

fn gemm_epilogue<B: Ops>(d: &B) {
    let shapes = [(1, 1, 1), (7, 5, 3), (33, 65, 17), (130, 129, 31)];
    for (i, &(m, n, k)) in shapes.iter().enumerate() {
        for act in Activation::ALL {
            for (beta, with_bias, separate_out, ta, tb) in [
                (0.0, true, true, false, false),
                (0.5, true, false, true, false),
                (-1.0, false, true, false, true),
                (0.0, true, false, true, true),
            ] {
                let g = Gemm::new(m, n, k).trans_a(ta).trans_b(tb).alpha(0.75).beta(beta).activation(act);
                let seed = i as u64 * 100;
                let a = inputs(seed + 1, m * k, 1.0);
                let b = inputs(seed + 2, k * n, 1.0);
                let bias = inputs(seed + 3, n, 2.0);
                let c0 = inputs(seed + 4, m * n, 1.0);
                let (ab, bb, biasb) = (up(d, &a), up(d, &b), up(d, &bias));
                let mut c = if beta == 0.0 { poisoned(d, m * n) } else { up(d, &c0) };
                let mut out = poisoned(d, m * n);
                let bias_view = B::view(&biasb);
                let bias_arg = if with_bias { Some(&bias_view) } else { None };
                {
                    let mut out_view = B::view_mut(&mut out);
                    let out_arg = if separate_out { Some(&mut out_view) } else { None };
                    d.gemm(&g, &B::view(&ab), &B::view(&bb), bias_arg, &mut B::view_mut(&mut c), out_arg).unwrap();
                }
                let (pre, post) = r::gemm(&g, &a, &b, if with_bias { Some(&bias) } else { None }, &c0);
                let name = format!("{} gemm epilogue {m}x{n}x{k} {act} beta={beta} bias={with_bias}", d.name());
                if separate_out {
                    assert_close(&format!("{name} (pre-activation)"), &down(d, &c), &pre, 1e-4, 1e-4);
                    assert_close(&format!("{name} (activation)"), &down(d, &out), &post, 1e-4, 1e-4);
                } else {
                    assert_close(&format!("{name} (in place)"), &down(d, &c), &post, 1e-4, 1e-4);
                    assert!(down(d, &out).iter().all(|v| v.is_nan()), "{name}: act_out written though not given");
                }
            }
        }
    }
}

fn gemm_rejects_bad_shapes<B: Ops>(d: &B) {
    let a = up(d, &inputs(1, 6, 1.0));
    let b = up(d, &inputs(2, 6, 1.0));
    let mut c = poisoned(d, 5);
    let e = d.gemm(&Gemm::new(2, 2, 3), &B::view(&a), &B::view(&b), None, &mut B::view_mut(&mut c), None).unwrap_err();
    assert!(matches!(e, Error::Shape { op: "gemm", .. }), "{e}");
    assert!(e.to_string().contains("C (2x2) has 5 elements, expected 4"), "{e}");
    let mut c = poisoned(d, 4);
    let bias = up(d, &[1.0; 3]);
    let e = d
        .gemm(&Gemm::new(2, 2, 3), &B::view(&a), &B::view(&b), Some(&B::view(&bias)), &mut B::view_mut(&mut c), None)
        .unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
    let e = d.gemm(&Gemm::new(3, 2, 3), &B::view(&a), &B::view(&b), None, &mut B::view_mut(&mut c), None).unwrap_err();
    assert!(e.to_string().contains("A (3x3) has 6 elements, expected 9"), "{e}");
}

fn activations<B: Ops>(d: &B) {
    for act in Activation::ALL {
        for (i, &n) in LENS.iter().enumerate() {
            let x = inputs(i as u64 + 7, n, 6.0);
            let dy = inputs(i as u64 + 70, n, 1.0);
            let (xb, dyb) = (up(d, &x), up(d, &dy));
            let mut y = poisoned(d, n);
            d.act_forward(act, &B::view(&xb), &mut B::view_mut(&mut y)).unwrap();
            let want: Vec<f64> = x.iter().map(|&z| r::act(act, z as f64)).collect();
            assert_close(&format!("{} {act} forward n={n}", d.name()), &down(d, &y), &want, 1e-6, 1e-5);
            let mut dx = poisoned(d, n);
            d.act_backward(act, &B::view(&xb), &B::view(&dyb), &mut B::view_mut(&mut dx)).unwrap();
            let want: Vec<f64> = x.iter().zip(&dy).map(|(&z, &g)| g as f64 * r::act_grad(act, z as f64)).collect();
            let got = down(d, &dx);
            assert_close(&format!("{} {act} backward n={n}", d.name()), &got, &want, 1e-6, 1e-5);
            // And against finite differences of the forward reference, away from ReLU's kink.
            for j in (0..n).step_by(97) {
                if x[j].abs() < 1e-3 {
                    continue;
                }
                let fd = finite_diff(|z| r::act(act, z[0]), &[x[j] as f64], 0, 1e-5) * dy[j] as f64;
                assert!(
                    (got[j] as f64 - fd).abs() <= 1e-4 + 1e-3 * fd.abs(),
                    "{act} backward at {}: {} vs fd {fd}",
                    x[j],
                    got[j]
                );
            }
        }
    }
    let x = up(d, &[1.0; 4]);
    let mut y = poisoned(d, 3);
    let e = d.act_forward(Activation::Relu, &B::view(&x), &mut B::view_mut(&mut y)).unwrap_err();
    assert!(e.to_string().contains("y has 3 elements, expected 4"), "{e}");
}

/// Every activation, forward and backward, at the tails and over a random bulk, against the
/// tail-safe f64 reference: within 1e-6 relative wherever the exact value is a normal f32, within
/// two subnormal steps where it is subnormal, and the correctly signed zero where it underflows.
/// Near a root of the derivative (GELU's at z = -0.75, SiLU's at -1.28) no f32 formula keeps
/// relative accuracy, so there the bound is 1e-6 of the size of the terms that cancel.
fn activation_tails<B: Ops>(d: &B) {
    let mut z: Vec<f32> = vec![0.0, -0.0];
    for v in [1e-8f32, 1.4, 5.6, 10.0, 30.0, 88.0, 1e4, 0.5, 2.0, 3.0, 7.0, 8.5, 13.0, 20.0, 87.0, 90.0, 104.0, 200.0] {
        z.push(v);
        z.push(-v);
    }
    // Every point where GELU's negative tail passes from normal to subnormal to zero.
    z.extend((0..2000).map(|i| -9.0 - i as f32 * 0.003));
    z.extend((0..2000).map(|i| -12.0 - i as f32 * 0.001));
    z.extend(inputs(91, 20_000, 12.0));
    z.extend(inputs(92, 5_000, 120.0));
    let n = z.len();
    let zb = up(d, &z);
    let ones = up(d, &vec![1.0; n]);
    let tiny = f32::from_bits(1) as f64; // the smallest subnormal, 2^-149
    let check = |what: &str, got: &[f32], want: &dyn Fn(f64) -> (f64, f64)| {
        let mut bad = Vec::new();
        for (i, &zi) in z.iter().enumerate() {
            let (r, scale) = want(zi as f64);
            let g = got[i];
            let ok = if r.abs() >= f32::MIN_POSITIVE as f64 {
                (g as f64 - r).abs() <= 1e-6 * r.abs().max(scale)
            } else if r == 0.0 {
                g == 0.0
            } else if r.abs() < tiny / 2.0 {
                g == 0.0 && g.is_sign_negative() == (r < 0.0)
            } else {
                // Subnormal: two steps of 2^-149 (the last rounding lands on an already rounded
                // product).
                (g as f64 - r).abs() <= 2.0 * tiny
            };
            if !ok {
                bad.push(format!("z = {zi:e}: {g:e} ({:#x}) vs {r:e}", g.to_bits()));
            }
        }
        assert!(
            bad.is_empty(),
            "{} {what}: {} of {n} outside the bounds, first: {:?}",
            d.name(),
            bad.len(),
            &bad[..bad.len().min(8)]
        );
    };
    for act in Activation::ALL {
        let mut y = poisoned(d, n);
        d.act_forward(act, &B::view(&zb), &mut B::view_mut(&mut y)).unwrap();
        check(&format!("{act} forward"), &down(d, &y), &|z| (r::act(act, z), 0.0));
        let mut dx = poisoned(d, n);
        d.act_backward(act, &B::view(&zb), &B::view(&ones), &mut B::view_mut(&mut dx)).unwrap();
        // The size of the two terms of each derivative (what cancels at its root).
        let terms = move |z: f64| -> f64 {
            let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
            match act {
                Activation::GeluErf => {
                    0.5 * libm::erfc(-z / std::f64::consts::SQRT_2)
                        + (z * (-0.5 * z * z).exp() / (2.0 * std::f64::consts::PI).sqrt()).abs()
                }
                Activation::GeluTanh => {
                    let c = (2.0 / std::f64::consts::PI).sqrt();
                    let u = c * (z + 0.044715 * z * z * z);
                    sig(2.0 * u) + (2.0 * z * sig(2.0 * u) * sig(-2.0 * u) * c * (1.0 + 0.134145 * z * z)).abs()
                }
                Activation::Silu => sig(z) * (1.0 + (z * sig(-z)).abs()),
                _ => 0.0,
            }
        };
        check(&format!("{act} backward"), &down(d, &dx), &|z| (r::act_grad(act, z), terms(z)));
    }
}

fn reductions<B: Ops>(d: &B) {
    for (i, &(rows, cols)) in
        [(1, 1), (1, 33), (7, 1), (13, 31), (129, 65), (1000, 10), (3, 1031), (256, 40), (4097, 33)].iter().enumerate()
    {
        let x = inputs(i as u64 + 11, rows * cols, 1.0);
        let o0 = inputs(i as u64 + 12, cols, 1.0);
        let xb = up(d, &x);
        for beta in [0.0, 1.0] {
            let mut out = if beta == 0.0 { poisoned(d, cols) } else { up(d, &o0) };
            d.col_sum(rows, cols, &B::view(&xb), beta, &mut B::view_mut(&mut out)).unwrap();
            assert_close(
                &format!("{} col_sum {rows}x{cols} beta={beta}", d.name()),
                &down(d, &out),
                &r::col_sum(rows, cols, &x, beta, &o0),
                1e-5,
                1e-5,
            );
        }
    }
    for (i, &n) in LENS.iter().enumerate() {
        let srcs: Vec<Vec<f32>> = (0..3).map(|j| inputs(i as u64 * 3 + j, n, 1.0)).collect();
        let bufs: Vec<_> = srcs.iter().map(|s| up(d, s)).collect();
        let views: Vec<_> = bufs.iter().map(|b| B::view(b)).collect();
        for k in 1..=3 {
            let refs: Vec<&B::Ref<'_, f32>> = views[..k].iter().collect();
            let mut out = poisoned(d, n);
            d.sum_scaled(&refs, 1.0 / k as f32, &mut B::view_mut(&mut out)).unwrap();
            let want = r::sum_scaled(&srcs[..k].iter().map(|s| s.as_slice()).collect::<Vec<_>>(), 1.0 / k as f32);
            assert_close(&format!("{} sum_scaled k={k} n={n}", d.name()), &down(d, &out), &want, 1e-6, 1e-5);
        }
        let mut y = up(d, &srcs[1]);
        d.axpy(-0.5, &B::view(&bufs[0]), &mut B::view_mut(&mut y)).unwrap();
        let want: Vec<f64> = srcs[0].iter().zip(&srcs[1]).map(|(&x, &y)| y as f64 - 0.5 * x as f64).collect();
        assert_close(&format!("{} axpy n={n}", d.name()), &down(d, &y), &want, 1e-6, 1e-5);
        d.scale(3.0, &mut B::view_mut(&mut y)).unwrap();
        let want: Vec<f64> = want.iter().map(|v| 3.0 * v).collect();
        assert_close(&format!("{} scale n={n}", d.name()), &down(d, &y), &want, 1e-5, 1e-5);
        for squared in [false, true] {
            let got = d.sum(&B::view(&bufs[2]), squared).unwrap();
            let want = r::sum(&srcs[2], squared);
            let tol = 1e-5 * (n as f64).sqrt() + 1e-5 * want.abs();
            assert!((got as f64 - want).abs() <= tol, "{} sum squared={squared} n={n}: {got} vs {want}", d.name());
            assert_eq!(
                got.to_bits(),
                d.sum(&B::view(&bufs[2]), squared).unwrap().to_bits(),
                "sum is not deterministic"
            );
        }
        let norm = d.l2_norm(&B::view(&bufs[2])).unwrap();
        let want = r::sum(&srcs[2], true).sqrt();
        assert!((norm as f64 - want).abs() <= 1e-5 * want + 1e-6, "l2 n={n}: {norm} vs {want}");
    }
    // Sub-views: a reduction over part of a buffer touches only that part.
    let x = inputs(5, 100, 1.0);
    let xb = up(d, &x);
    let whole = B::view(&xb);
    let part = B::sub(&whole, 10..30);
    let got = d.sum(&part, false).unwrap();
    assert!((got as f64 - r::sum(&x[10..30], false)).abs() < 1e-5);
    let one = up(d, &[1.0; 4]);
    let mut out = poisoned(d, 5);
    let e = d.sum_scaled(&[&B::view(&one)], 1.0, &mut B::view_mut(&mut out)).unwrap_err();
    assert!(e.to_string().contains("source 0 has 4 elements, expected 5"), "{e}");
    let e = d.col_sum(3, 2, &B::view(&one), 0.0, &mut B::view_mut(&mut out)).unwrap_err();
    assert!(e.to_string().contains("x (3x2) has 4 elements, expected 6"), "{e}");
}

/// Rows whose label holds the largest logit by a wide margin: the loss is small (1e-2 down to
/// 1e-7) and must keep its relative accuracy (log(sum) would cancel against max - x_label), at
/// 65 classes (a character vocabulary) and 50,257 (GPT-2's).
fn cross_entropy_confident_rows<B: Ops>(d: &B) {
    for cols in [2usize, 10, 65, 50_257] {
        for margin in [5.0f32, 9.0, 13.0, 18.0, 25.0] {
            let mut logits = inputs(cols as u64, cols, 0.5);
            let label = cols / 3;
            logits[label] = margin;
            let (want, _) = r::xent(1, cols, &logits, &[label as i32], 1.0);
            let lb = up(d, &logits);
            let yb = d.upload(&[label as i32]).unwrap();
            let got = d.xent(1, cols, &B::view(&lb), &B::view(&yb)).unwrap() as f64;
            let mut g = poisoned(d, cols);
            let got_b =
                d.xent_backward(1, cols, &B::view(&lb), &B::view(&yb), &mut B::view_mut(&mut g)).unwrap() as f64;
            for (what, v) in [("xent", got), ("xent_backward", got_b)] {
                assert!(
                    (v - want[0]).abs() <= 2e-6 * want[0],
                    "{} {what} {cols} classes, margin {margin}: {v:e} vs {:e} (relative {:e})",
                    d.name(),
                    want[0],
                    (v - want[0]).abs() / want[0]
                );
            }
        }
    }
}

fn labels_for(seed: u64, rows: usize, cols: usize) -> Vec<i32> {
    let mut rng = tessera::rng::Rng::new(seed);
    (0..rows).map(|_| rng.below(cols) as i32).collect()
}

fn cross_entropy<B: Ops>(d: &B) {
    for (i, &(rows, cols)) in [(1, 1), (1, 2), (3, 10), (17, 33), (128, 10), (5, 1031), (300, 7)].iter().enumerate() {
        let logits = inputs(i as u64 + 21, rows * cols, 4.0);
        let labels = labels_for(i as u64, rows, cols);
        let (lb, yb) = (up(d, &logits), d.upload(&labels).unwrap());
        let (row_loss, grad) = r::xent(rows, cols, &logits, &labels, 1.0 / rows as f64);
        let want = row_loss.iter().sum::<f64>() / rows as f64;
        let got = d.xent(rows, cols, &B::view(&lb), &B::view(&yb)).unwrap();
        assert!(
            (got as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{} xent {rows}x{cols}: {got} vs {want}",
            d.name()
        );
        let mut dl = poisoned(d, rows * cols);
        let got2 = d.xent_backward(rows, cols, &B::view(&lb), &B::view(&yb), &mut B::view_mut(&mut dl)).unwrap();
        assert!((got2 as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "fused loss {got2} vs {want}");
        let g = down(d, &dl);
        assert_close(&format!("{} xent backward {rows}x{cols}", d.name()), &g, &grad, 1e-6, 1e-4);
        // Finite differences of the f64 mean loss, on a few logits.
        let mean_loss = |z: &[f64]| {
            let zf: Vec<f32> = z.iter().map(|&v| v as f32).collect();
            let _ = &zf;
            (0..rows)
                .map(|rr| {
                    let row = &z[rr * cols..(rr + 1) * cols];
                    let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - row[labels[rr] as usize]
                })
                .sum::<f64>()
                / rows as f64
        };
        let z = f64s(&logits);
        for j in (0..rows * cols).step_by(37) {
            let fd = finite_diff(mean_loss, &z, j, 1e-5);
            assert!((g[j] as f64 - fd).abs() <= 1e-5 + 1e-3 * fd.abs(), "xent grad [{j}]: {} vs fd {fd}", g[j]);
        }
    }
    // Large logits stay finite (the row max is subtracted).
    let logits = [1000.0f32, 0.0, -1000.0, 3e4, 3e4 + 1.0, 0.0];
    let lb = up(d, &logits);
    let yb = d.upload(&[0i32, 1]).unwrap();
    let got = d.xent(2, 3, &B::view(&lb), &B::view(&yb)).unwrap();
    let want = r::xent(2, 3, &logits, &[0, 1], 0.5).0.iter().sum::<f64>() / 2.0;
    assert!(got.is_finite() && (got as f64 - want).abs() < 1e-4, "large logits: {got} vs {want}");
}

/// f32 to bf16 and f16 and back, on every class of value (zeros, normals, ties to even in both
/// directions, the largest finite values and overflow, f16's subnormals and underflow,
/// infinities, NaNs with payloads) and on a seeded spread: the device's bits are the `half`
/// crate's, and back to f32 is exact.
fn half_conversions<B: Ops>(d: &B) {
    use tessera::Half;
    let mut xs: Vec<f32> = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        1.0 + f32::EPSILON,
        f32::from_bits(0x3f80_8000), // a bf16 tie: 1 + 2^-8, rounds to even (down)
        f32::from_bits(0x3f81_8000), // a bf16 tie rounding up
        f32::from_bits(0x3f80_1000), // an f16 tie
        f32::from_bits(0x3f80_3000), // an f16 tie rounding up
        65504.0,                     // f16's largest
        65520.0,                     // rounds to f16 infinity
        1e5,
        f32::MAX,
        -f32::MAX,
        f32::MIN_POSITIVE,
        6.1e-5,  // near f16's smallest normal
        5.96e-8, // f16's smallest subnormal
        2.98e-8, // half of it: a tie to zero
        3.0e-8,  // just above: rounds up
        1e-10,   // underflows in f16
        1e-40,   // an f32 subnormal
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7f80_0001), // a signalling NaN
        f32::from_bits(0xffc1_2345), // a negative NaN with a payload
    ];
    xs.extend(inputs(9001, 4000, 70000.0));
    xs.extend(inputs(9002, 1000, 1e-3));
    xs.extend(inputs(9003, 1000, 1e-6));
    let xb = up(d, &xs);
    for fmt in [Half::Bf16, Half::F16] {
        let mut hb = d.alloc::<u16>(xs.len()).unwrap();
        d.f32_to_half(fmt, &B::view(&xb), &mut B::view_mut(&mut hb)).unwrap();
        let got = d.download(&B::view(&hb)).unwrap();
        let want: Vec<u16> = xs
            .iter()
            .map(|&x| match fmt {
                Half::Bf16 => half::bf16::from_f32(x).to_bits(),
                Half::F16 => half::f16::from_f32(x).to_bits(),
            })
            .collect();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{} {fmt:?} of {:e} ({:#010x}): {g:#06x} vs {w:#06x}", d.name(), xs[i], xs[i].to_bits());
        }
        let mut back = poisoned(d, xs.len());
        d.half_to_f32(fmt, &B::view(&hb), &mut B::view_mut(&mut back)).unwrap();
        let back = down(d, &back);
        for (i, (&b, &h)) in back.iter().zip(&want).enumerate() {
            let w = match fmt {
                Half::Bf16 => half::bf16::from_bits(h).to_f32(),
                Half::F16 => half::f16::from_bits(h).to_f32(),
            };
            assert!(b.to_bits() == w.to_bits(), "{} {fmt:?} back [{i}]: {b:e} vs {w:e}", d.name());
        }
        let mut short = d.alloc::<u16>(3).unwrap();
        assert!(d.f32_to_half(fmt, &B::view(&xb), &mut B::view_mut(&mut short)).is_err());
    }
}

/// The vocabulary-parallel cross-entropy: the classes split unevenly over 1 to 4 ranks (a rank
/// may hold none), each rank's stats summed (the group's all-reduce, here on the host), then
/// each rank's part of the gradient: the loss and every column of the gradient are the whole
/// cross-entropy's, against the f64 reference.
fn vocab_parallel_cross_entropy<B: Ops>(d: &B) {
    for (i, &(rows, cols)) in [(1, 1), (3, 10), (17, 33), (5, 65), (64, 7)].iter().enumerate() {
        let logits = inputs(i as u64 + 41, rows * cols, 4.0);
        let labels = labels_for(i as u64 + 3, rows, cols);
        let (row_loss, grad) = r::xent(rows, cols, &logits, &labels, 0.5 / rows as f64);
        let want = 0.5 * row_loss.iter().sum::<f64>() / rows as f64;
        let yb = d.upload(&labels).unwrap();
        for tp in 1..=4 {
            let parts = tessera::parallel::comm::chunks(cols, tp);
            let local = |k: usize| -> Vec<f32> {
                let p = &parts[k];
                (0..rows).flat_map(|r| logits[r * cols + p.start..r * cols + p.end].to_vec()).collect()
            };
            let mut stats = vec![0f32; rows * (tp + 1)];
            for (k, part) in parts.iter().enumerate() {
                let lb = up(d, &local(k));
                let mut sb = poisoned(d, rows * (tp + 1));
                d.xent_part_stats(
                    rows,
                    part.len(),
                    part.start,
                    cols,
                    (k, tp),
                    &B::view(&lb),
                    &B::view(&yb),
                    &mut B::view_mut(&mut sb),
                )
                .unwrap();
                stats.iter_mut().zip(down(d, &sb)).for_each(|(s, v)| *s += v);
            }
            let sb = up(d, &stats);
            let name = format!("{} vocabulary-parallel xent {rows}x{cols} over {tp}", d.name());
            for k in 0..tp {
                let (lb, n) = (up(d, &local(k)), parts[k].len());
                let (mut dl, mut rl, mut loss) = (poisoned(d, rows * n), poisoned(d, rows), poisoned(d, 1));
                d.xent_part_backward(
                    rows,
                    n,
                    parts[k].start,
                    tp,
                    &B::view(&lb),
                    &B::view(&yb),
                    &B::view(&sb),
                    0.5 / rows as f32,
                    &mut B::view_mut(&mut dl),
                    &mut B::view_mut(&mut rl),
                    &mut B::view_mut(&mut loss),
                )
                .unwrap();
                let got = down(d, &loss)[0] as f64;
                assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{name}: loss {got} vs {want}");
                let want_g: Vec<f64> =
                    (0..rows).flat_map(|r| grad[r * cols + parts[k].start..r * cols + parts[k].end].to_vec()).collect();
                assert_close(&format!("{name}, rank {k}'s gradient"), &down(d, &dl), &want_g, 1e-6, 1e-4);
            }
        }
    }
}

fn cross_entropy_rejects_bad_labels<B: Ops>(d: &B) {
    let lb = up(d, &inputs(1, 4 * 3, 1.0));
    for bad in [3, -1, 1_000_000] {
        let yb = d.upload(&[0i32, 2, bad, 1]).unwrap();
        let e = d.xent(4, 3, &B::view(&lb), &B::view(&yb)).unwrap_err();
        assert!(matches!(e, Error::Label { row: 2, classes: 3, .. }), "{e}");
        assert!(e.to_string().contains(&format!("label {bad} at row 2 is out of range")), "{e}");
        let mut dl = poisoned(d, 12);
        let e = d.xent_backward(4, 3, &B::view(&lb), &B::view(&yb), &mut B::view_mut(&mut dl)).unwrap_err();
        assert!(matches!(e, Error::Label { row: 2, .. }), "{e}");
    }
    let yb = d.upload(&[0i32, 1, 2]).unwrap();
    let e = d.xent(4, 3, &B::view(&lb), &B::view(&yb)).unwrap_err();
    assert!(e.to_string().contains("labels (one per row) has 3 elements, expected 4"), "{e}");
}

fn mean_squared_error<B: Ops>(d: &B) {
    for (i, &n) in LENS.iter().enumerate() {
        let p = inputs(i as u64 + 31, n, 2.0);
        let t = inputs(i as u64 + 32, n, 2.0);
        let (pb, tb) = (up(d, &p), up(d, &t));
        let want = r::mse(&p, &t);
        let got = d.mse(&B::view(&pb), &B::view(&tb)).unwrap();
        assert!((got as f64 - want).abs() <= 1e-5 * want, "{} mse n={n}: {got} vs {want}", d.name());
        let mut dp = poisoned(d, n);
        let got2 = d.mse_backward(&B::view(&pb), &B::view(&tb), &mut B::view_mut(&mut dp)).unwrap();
        assert!((got2 as f64 - want).abs() <= 1e-5 * want);
        let g = down(d, &dp);
        let want_g: Vec<f64> = p.iter().zip(&t).map(|(&p, &t)| 2.0 * (p as f64 - t as f64) / n as f64).collect();
        assert_close(&format!("{} mse backward n={n}", d.name()), &g, &want_g, 1e-9, 1e-5);
        if n <= 1031 {
            let tt = f64s(&t);
            let f = |z: &[f64]| z.iter().zip(&tt).map(|(a, b)| (a - b).powi(2)).sum::<f64>() / n as f64;
            for j in (0..n).step_by(53) {
                let fd = finite_diff(f, &f64s(&p), j, 1e-5);
                assert!((g[j] as f64 - fd).abs() <= 1e-7 + 1e-3 * fd.abs(), "mse grad [{j}]: {} vs {fd}", g[j]);
            }
        }
    }
}

fn optimizers<B: Ops>(d: &B) {
    let sgd = Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-2 };
    let adam = AdamW { lr: 1e-2, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 };
    for (i, &n) in LENS.iter().enumerate() {
        let s = i as u64 * 5;
        let (w, g, m) = (inputs(s + 1, n, 1.0), inputs(s + 2, n, 1.0), inputs(s + 3, n, 0.1));
        let v: Vec<f32> = inputs(s + 4, n, 0.1).iter().map(|x| x * x).collect();
        let (mut wb, gb, mut mb, mut vb) = (up(d, &w), up(d, &g), up(d, &m), up(d, &v));
        d.sgd_step(&sgd, 0.5, &mut B::view_mut(&mut wb), &B::view(&gb), &mut B::view_mut(&mut mb)).unwrap();
        let (ww, mm) = r::sgd(&sgd, 0.5, &w, &g, &m);
        assert_close(&format!("{} sgd w n={n}", d.name()), &down(d, &wb), &ww, 1e-6, 1e-5);
        assert_close(&format!("{} sgd momentum n={n}", d.name()), &down(d, &mb), &mm, 1e-6, 1e-5);
        let (mut wb, mut mb) = (up(d, &w), up(d, &m));
        for t in [1u64, 7] {
            let (w0, m0, v0) = (down(d, &wb), down(d, &mb), down(d, &vb));
            d.adamw_step(
                &adam,
                t,
                0.8,
                &mut B::view_mut(&mut wb),
                &B::view(&gb),
                &mut B::view_mut(&mut mb),
                &mut B::view_mut(&mut vb),
            )
            .unwrap();
            let (ww, mm, vv) = r::adamw(&adam, t, 0.8, &w0, &g, &m0, &v0);
            assert_close(&format!("{} adamw w t={t} n={n}", d.name()), &down(d, &wb), &ww, 1e-6, 1e-5);
            assert_close(&format!("{} adamw m t={t} n={n}", d.name()), &down(d, &mb), &mm, 1e-7, 1e-5);
            assert_close(&format!("{} adamw v t={t} n={n}", d.name()), &down(d, &vb), &vv, 1e-9, 1e-5);
        }
    }
    let mut w = up(d, &[1.0; 3]);
    let g = up(d, &[1.0; 3]);
    let mut m = up(d, &[1.0; 2]);
    let e = d.sgd_step(&sgd, 1.0, &mut B::view_mut(&mut w), &B::view(&g), &mut B::view_mut(&mut m)).unwrap_err();
    assert!(e.to_string().contains("momentum has 2 elements, expected 3"), "{e}");
    let mut m = up(d, &[1.0; 3]);
    let bad = Sgd { lr: f32::NAN, ..sgd };
    let e = d.sgd_step(&bad, 1.0, &mut B::view_mut(&mut w), &B::view(&g), &mut B::view_mut(&mut m)).unwrap_err();
    assert!(e.to_string().contains("learning rate"), "{e}");
    let mut v = up(d, &[1.0; 3]);
    let e = d
        .adamw_step(
            &adam,
            0,
            1.0,
            &mut B::view_mut(&mut w),
            &B::view(&g),
            &mut B::view_mut(&mut m),
            &mut B::view_mut(&mut v),
        )
        .unwrap_err();
    assert!(e.to_string().contains("start at 1"), "{e}");
}

fn copies_between_devices<B: Ops>(a: &B, b: &B) {
    let x = inputs(3, 1031, 1.0);
    let xa = up(a, &x);
    let mut yb = poisoned(b, 1031);
    // b reads what a's queue wrote: b's queue waits for it first (an event, not the host).
    b.wait_event(&a.record_event().unwrap()).unwrap();
    b.copy(&B::view(&xa), &mut B::view_mut(&mut yb)).unwrap();
    b.synchronize().unwrap();
    assert_eq!(down(b, &yb), x);
    let mut short = poisoned(b, 5);
    assert!(b.copy(&B::view(&xa), &mut B::view_mut(&mut short)).is_err());
}

/// GPU 0 when there is one; `None` (and the test says it skipped) when not.
fn gpu() -> Option<tessera::CudaDevice> {
    tessera::check::gpu_or_skip("the ops on the GPU")
}

macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod cpu {
            $( #[test] fn $name() { super::$name(&tessera::CpuDevice::new(0)); } )*
            #[test] fn copies_between_devices() {
                super::copies_between_devices(&tessera::CpuDevice::new(0), &tessera::CpuDevice::new(1));
            }
        }
        mod sim {
            /// Every suite on the CUDA simulator (the same kernels, run on the CPU), then a check
            /// that every kernel the simulator can run was launched. One test: launches in the
            /// simulator run one at a time anyway.
            #[test] fn every_kernel_against_the_reference() {
                let d = tessera::SimDevice::new(0);
                $( eprintln!("sim: {}", stringify!($name)); super::$name(&d); )*
                super::copies_between_devices(&d, &tessera::SimDevice::new(1));
                // Again with work deferred until waited on: every op's temporaries, and the copy
                // between devices, respect stream order.
                let g = tessera::SimDevice::group(2, tessera::StreamOrder::Deferred { shuffle: Some(1) });
                $( eprintln!("sim (deferred): {}", stringify!($name)); super::$name(&g[0]); )*
                super::copies_between_devices(&g[0], &g[1]);
                let ran = tessera::backend::sim::launch_counts();
                let missed: Vec<&str> = tessera::backend::sim::SIM_KERNELS
                    .iter()
                    .filter(|k| !k.planted && k.unsupported.is_none() && !ran.contains_key(k.name))
                    .map(|k| k.name)
                    .collect();
                assert!(missed.is_empty(), "kernels the simulator can run but no suite launched: {missed:?}");
                let cannot: Vec<String> = tessera::backend::sim::SIM_KERNELS
                    .iter()
                    .filter_map(|k| k.unsupported.map(|why| format!("{} ({why})", k.name)))
                    .collect();
                eprintln!("sim: {} launches of {} kernels; cannot run: {:?}", ran.values().sum::<u64>(), ran.len(), cannot);
            }
        }
        mod cuda {
            $( #[test] fn $name() { if let Some(d) = super::gpu() { super::$name(&d); } } )*
            #[test] fn copies_between_devices() {
                if let Some(d) = super::gpu() {
                    let other = d.logical(1).unwrap();
                    super::copies_between_devices(&d, &other);
                }
            }
        }
    };
}

on_every_backend!(
    gemm_shapes_and_transposes,
    gemm_every_kernel,
    gemm_split_k,
    gemm_epilogue,
    gemm_rejects_bad_shapes,
    activations,
    activation_tails,
    reductions,
    cross_entropy,
    cross_entropy_confident_rows,
    cross_entropy_rejects_bad_labels,
    vocab_parallel_cross_entropy,
    half_conversions,
    mean_squared_error,
    optimizers,
    embedding,
    layernorm,
    attention,
);
