// The backend conformance cases, shared by tests/conformance.rs and the GPU check bundle
// (examples/gpu_bundle.rs), which runs them on a lent GPU. Included, not a module.

/// Each case: a name and IR text over the symbol `N`. Inputs are uniform in [-1, 1]
/// (integers in [0, 4)); ops with restricted domains take `abs(x) + 1` first.
const CASES: &[(&str, &str)] = &[
    (
        "unary",
        r#"
  %x = input "x" : f32[N, 3]
  %a = abs(%x) : f32[N, 3]
  %one = const[value=1.0] : f32[N, 3]
  %p = add(%a, %one) : f32[N, 3]
  %e = exp(%x) : f32[N, 3]
  %l = log(%p) : f32[N, 3]
  %s = sqrt(%a) : f32[N, 3]
  %r = rsqrt(%p) : f32[N, 3]
  %c = recip(%p) : f32[N, 3]
  %g = sigmoid(%x) : f32[N, 3]
  %t = tanh(%x) : f32[N, 3]
  %si = sin(%x) : f32[N, 3]
  %co = cos(%x) : f32[N, 3]
  %n = neg(%x) : f32[N, 3]
  %u = silu(%x) : f32[N, 3]
  %y = concat[axis=1](%e, %l, %s, %r, %c, %g, %t, %si, %co, %n, %u) : f32[N, 33]
  output "y" = %y"#,
    ),
    (
        "binary-compare-select",
        r#"
  %x = input "x" : f32[N, 5]
  %z = input "z" : f32[N, 5]
  %a = abs(%x) : f32[N, 5]
  %one = const[value=1.0] : f32[N, 5]
  %p = add(%a, %one) : f32[N, 5]
  %s = sub(%x, %z) : f32[N, 5]
  %m = mul(%x, %z) : f32[N, 5]
  %d = div(%z, %p) : f32[N, 5]
  %mx = max(%x, %z) : f32[N, 5]
  %mn = min(%x, %z) : f32[N, 5]
  %pw = pow(%p, %z) : f32[N, 5]
  %lt = lt(%x, %z) : bool[N, 5]
  %sel = select(%lt, %x, %z) : f32[N, 5]
  %ge = ge(%x, %z) : bool[N, 5]
  %sel2 = select(%ge, %s, %m) : f32[N, 5]
  %y = concat[axis=1](%s, %m, %d, %mx, %mn, %pw, %sel, %sel2) : f32[N, 40]
  output "y" = %y"#,
    ),
    (
        "casts-iota-const",
        r#"
  %x = input "x" : f32[N, 4]
  %k = const[value=7.5] : f32[N, 4]
  %xk = mul(%x, %k) : f32[N, 4]
  %i = cast(%xk) : i64[N, 4]
  %f = cast(%i) : f32[N, 4]
  %b = cast(%xk) : bf16[N, 4]
  %bf = cast(%b) : f32[N, 4]
  %h = cast(%xk) : f16[N, 4]
  %hf = cast(%h) : f32[N, 4]
  %io = iota[axis=0] : f32[N, 4]
  %y = concat[axis=1](%f, %bf, %hf, %io) : f32[N, 16]
  output "y" = %y"#,
    ),
    (
        "reductions",
        r#"
  %x = input "x" : f32[N, 7]
  %s0 = reduce_sum[axis=0](%x) : f32[1, 7]
  %m0 = reduce_max[axis=0](%x) : f32[1, 7]
  %a0 = reduce_mean[axis=0](%x) : f32[1, 7]
  %s1 = reduce_sum[axis=1](%x) : f32[N, 1]
  %m1 = reduce_max[axis=1](%x) : f32[N, 1]
  %a1 = reduce_mean[axis=1](%x) : f32[N, 1]
  %r0 = concat[axis=0](%s0, %m0, %a0) : f32[3, 7]
  %r1 = concat[axis=1](%s1, %m1, %a1) : f32[N, 3]
  output "r0" = %r0
  output "r1" = %r1"#,
    ),
    (
        // Long unit-stride rows (a warp per row on the GPU from 32 elements), and an
        // expression reduced (a product of two loads, one broadcast along the row).
        "reductions-long-rows",
        r#"
  %x = input "x" : f32[5, N]
  %y = input "y" : f32[5, 1]
  %yb = broadcast(%y) : f32[5, N]
  %p = mul(%x, %yb) : f32[5, N]
  %s = reduce_sum[axis=1](%p) : f32[5, 1]
  %m = reduce_max[axis=1](%x) : f32[5, 1]
  %a = reduce_mean[axis=1](%x) : f32[5, 1]
  %r = concat[axis=1](%s, %m, %a) : f32[5, 3]
  output "r" = %r"#,
    ),
    (
        // Sums over a matrix's rows, as a weight's gradient sums over tokens: on the GPU a
        // block per 32 outputs from 32 rows (`gpu_by_columns`; 7 groups of outputs here,
        // more than the simulator's blocks), and over a transposed operand's rows; fewer
        // rows take a thread per output.
        "reductions-columns",
        r#"
  %x = input "x" : f32[2, N, 100]
  %s = reduce_sum[axis=1](%x) : f32[2, 1, 100]
  %m = reduce_max[axis=1](%x) : f32[2, 1, 100]
  %a = reduce_mean[axis=1](%x) : f32[2, 1, 100]
  %y = input "y" : f32[N, 3]
  %yt = permute[perm=[1, 0]](%y) : f32[3, N]
  %t = reduce_sum[axis=1](%yt) : f32[3, 1]
  %r = concat[axis=1](%s, %m, %a) : f32[2, 3, 100]
  output "r" = %r
  output "t" = %t"#,
    ),
    (
        "softmax",
        r#"
  %x = input "x" : f32[3, N]
  %a = softmax[axis=1](%x) : f32[3, N]
  %b = softmax[axis=0](%x) : f32[3, N]
  output "a" = %a
  output "b" = %b"#,
    ),
    (
        "matmul-weights",
        r#"
  %x = input "x" : f32[N, 17]
  %w = param "w" : f32[9, 17]
  %wt = permute[perm=[1, 0]](%w) : f32[17, 9]
  %y = matmul(%x, %wt) : f32[N, 9]
  %v = param "v" : f32[9, 5]
  %z = matmul(%y, %v) : f32[N, 5]
  output "z" = %z"#,
    ),
    (
        // A computed left operand (stored bf16 by its kernel with tensor cores) and a weight
        // (a bf16 copy at load), with enough 128 × 128 tiles at N = 1000 for the tiled
        // kernels: with tensor cores, the `cp.async` ring, and `wgmma` on sm_90a.
        "matmul-computed-operand",
        r#"
  %x = input "x" : f32[2, N, 40]
  %a = neg(%x) : f32[2, N, 40]
  %w = param "w" : f32[40, 1104]
  %y = matmul(%a, %w) : f32[2, N, 1104]
  output "y" = %y"#,
    ),
    (
        // The residual add folded into the GPU matmul (`Kernel::MatMul::res`): on either
        // side of the add, from a strided (permuted) view, batched; and a product with a
        // second use, which keeps its add.
        "matmul-residual",
        r#"
  %a = input "a" : f32[2, N, 5]
  %b = input "b" : f32[2, 5, 7]
  %y = matmul(%a, %b) : f32[2, N, 7]
  %r = input "r" : f32[2, 7, N]
  %rt = permute[perm=[0, 2, 1]](%r) : f32[2, N, 7]
  %z = add(%rt, %y) : f32[2, N, 7]
  %w = param "w" : f32[7, 3]
  %p = matmul(%z, %w) : f32[2, N, 3]
  %q = input "q" : f32[2, N, 3]
  %s = add(%p, %q) : f32[2, N, 3]
  %w2 = param "w2" : f32[3, 3]
  %u = matmul(%s, %w2) : f32[2, N, 3]
  %t = add(%u, %u) : f32[2, N, 3]
  output "s" = %s
  output "t" = %t"#,
    ),
    (
        "matmul-batched",
        r#"
  %a = input "a" : f32[2, N, 5]
  %b = input "b" : f32[2, 5, N]
  %y = matmul(%a, %b) : f32[2, N, N]
  output "y" = %y"#,
    ),
    (
        // A constant k of 512 or more: on the GPU, with more than 32 rows but too few tiles
        // for the tiled kernels (N = 63, 65), k is split and the slices summed by a second
        // kernel (with the residual folded into the first product); N = 1000 takes the
        // small tiles for `z`, fewer rows the row-block kernel. `v`'s k (520) is 33 of the
        // tiled kernel's k-steps, the last one partial: slices of five, the eighth empty.
        // Fused norms split too (`p` with the norm weight folded into the weights at load,
        // `q` with it applied as `d` loads), each partial tile scaled by its rows' norms.
        "matmul-split-k",
        r#"
  %a = input "a" : f32[2, N, 4100]
  %b = input "b" : f32[4100, 70]
  %r = input "r" : f32[2, N, 70]
  %y = matmul(%a, %b) : f32[2, N, 70]
  %z = add(%y, %r) : f32[2, N, 70]
  %c = input "c" : f32[4100, 3]
  %u = matmul(%a, %c) : f32[2, N, 3]
  %d = input "d" : f32[N, 520]
  %e = input "e" : f32[520, 9]
  %v = matmul(%d, %e) : f32[N, 9]
  %g = param "g" : f32[520]
  %f = param "f" : f32[520, 9]
  %p = rms_norm_matmul[eps=1e-5](%d, %g, %f) : f32[N, 9]
  %q = rms_norm_matmul[eps=1e-5](%d, %g, %e) : f32[N, 9]
  output "z" = %z
  output "u" = %u
  output "v" = %v
  output "p" = %p
  output "q" = %q"#,
    ),
    (
        "matmul-long-k",
        r#"
  %a = input "a" : f32[3, N]
  %b = input "b" : f32[N, 4]
  %y = matmul(%a, %b) : f32[3, 4]
  output "y" = %y"#,
    ),
    (
        "rms-norm-swiglu",
        r#"
  %x = input "x" : f32[N, 6]
  %g = param "g" : f32[6]
  %n = rms_norm[eps=1e-5](%x, %g) : f32[N, 6]
  %w = param "w" : f32[6, 8]
  %m = rms_norm_matmul[eps=1e-6](%x, %g, %w) : f32[N, 8]
  %u = input "u" : f32[N, 8]
  %s = swiglu(%m, %u) : f32[N, 8]
  output "n" = %n
  output "s" = %s"#,
    ),
    (
        "attention-gqa",
        r#"
  %q = input "q" : f32[1, 4, N, 8]
  %k = input "k" : f32[1, 2, N, 8]
  %v = input "v" : f32[1, 2, N, 8]
  %pos = iota[axis=1] : i64[1, N]
  %o = fused_attention[scale=0.35](%q, %k, %v, %pos) : f32[1, 4, N, 8]
  output "o" = %o"#,
    ),
    (
        // Few query rows over many keys: the split-KV path (at N = 1000, 7 splits, the
        // first row's later splits see no visible key at all).
        "attention-decode",
        r#"
  %q = input "q" : f32[1, 4, 2, 8]
  %k = input "k" : f32[1, 2, N, 8]
  %v = input "v" : f32[1, 2, N, 8]
  %i = iota[axis=1] : i64[1, 2]
  %a = const[value=600.0] : i64[1, 2]
  %b = const[value=300.0] : i64[1, 2]
  %m = mul(%i, %a) : i64[1, 2]
  %pos = add(%m, %b) : i64[1, 2]
  %o = fused_attention[scale=0.35](%q, %k, %v, %pos) : f32[1, 4, 2, 8]
  output "o" = %o"#,
    ),
    (
        // Attention's backward over a batch of N short sequences behind a cache of two
        // keys: query and key head size 33 (past one warp's lanes), value head size 20,
        // two query heads on one KV head.
        "attention-backward",
        r#"
  %q = input "q" : f32[N, 2, 4, 33]
  %k = input "k" : f32[N, 1, 6, 33]
  %v = input "v" : f32[N, 1, 6, 20]
  %i = iota[axis=1] : i64[N, 4]
  %two = const[value=2.0] : i64[N, 4]
  %pos = add(%i, %two) : i64[N, 4]
  %o = fused_attention[scale=0.3](%q, %k, %v, %pos) : f32[N, 2, 4, 20]
  %do = input "do" : f32[N, 2, 4, 20]
  %lse = attention_lse[scale=0.3](%q, %k, %pos) : f32[N, 2, 4]
  %m = mul(%do, %o) : f32[N, 2, 4, 20]
  %r = reduce_sum[axis=3](%m) : f32[N, 2, 4, 1]
  %delta = reshape(%r) : f32[N, 2, 4]
  %dq = attention_grad_q[scale=0.3](%q, %k, %v, %pos, %do, %lse, %delta) : f32[N, 2, 4, 33]
  %dk = attention_grad_k[scale=0.3](%q, %k, %v, %pos, %do, %lse, %delta) : f32[N, 1, 6, 33]
  %dv = attention_grad_v[scale=0.3](%q, %k, %v, %pos, %do, %lse, %delta) : f32[N, 1, 6, 20]
  output "lse" = %lse
  output "dq" = %dq
  output "dk" = %dk
  output "dv" = %dv"#,
    ),
    (
        // Strided operands (a transposed left side, a transposed weight) at sizes on both
        // sides of the GPU's tiled-matmul threshold, with row, column and k tails.
        "matmul-strided",
        r#"
  %x = input "x" : f32[37, N]
  %xt = permute[perm=[1, 0]](%x) : f32[N, 37]
  %w = input "w" : f32[130, 37]
  %wt = permute[perm=[1, 0]](%w) : f32[37, 130]
  %y = matmul(%xt, %wt) : f32[N, 130]
  output "y" = %y"#,
    ),
    (
        // Enough output tiles (2 × 8 × 9 at N = 1000) for the GPU's tiled and tensor-core
        // matmuls; few rows (N ≤ 32) take the row-block kernel.
        "matmul-wide",
        r#"
  %x = input "x" : f32[2, N, 40]
  %w = param "w" : f32[40, 1100]
  %y = matmul(%x, %w) : f32[2, N, 1100]
  output "y" = %y"#,
    ),
    (
        // Summed over the batch axis, as a weight's gradient is: one summing kernel on the CPU.
        "matmul-summed-over-batch",
        r#"
  %x = input "x" : f32[3, N, 13]
  %xt = permute[perm=[0, 2, 1]](%x) : f32[3, 13, N]
  %g = input "g" : f32[3, N, 40]
  %d = matmul(%xt, %g) : f32[3, 13, 40]
  %s = reduce_sum[axis=0](%d) : f32[1, 13, 40]
  %w = param "w" : f32[13, 33]
  %e = matmul(%x, %w) : f32[3, N, 33]
  %t = reduce_sum[axis=0](%e) : f32[1, N, 33]
  output "s" = %s
  output "t" = %t"#,
    ),
    (
        // Weights computed at run time, K beyond one packed slice: the norm's row scale
        // applies once all of K is summed.
        "rms-norm-matmul-runtime-weights",
        r#"
  %x = input "x" : f32[N, 300]
  %g = input "g" : f32[300]
  %w = input "w" : f32[300, 45]
  %y = rms_norm_matmul[eps=1e-5](%x, %g, %w) : f32[N, 45]
  output "y" = %y"#,
    ),
    (
        "views",
        r#"
  %x = input "x" : f32[2, N, 3]
  %p = permute[perm=[2, 0, 1]](%x) : f32[3, 2, N]
  %s = slice[axis=0, start=1, end=3](%p) : f32[2, 2, N]
  %r = reshape(%s) : f32[4, N]
  %c = input "c" : f32[1, N]
  %b = broadcast(%c) : f32[4, N]
  %y = add(%r, %b) : f32[4, N]
  %t = permute[perm=[1, 0]](%y) : f32[N, 4]
  output "t" = %t"#,
    ),
    (
        // Elementwise kernels that transpose (an optimizer's update reading a weight's
        // gradient computed transposed): on the GPU in 32 × 32 tiles (`gpu_tiled_order`),
        // with partial tiles along both axes and more tiles than the simulator's blocks;
        // and batched.
        "transposing-elementwise",
        r#"
  %p = input "p" : f32[N, 70]
  %g = input "g" : f32[70, N]
  %gt = permute[perm=[1, 0]](%g) : f32[N, 70]
  %s = mul(%gt, %gt) : f32[N, 70]
  %u = sub(%p, %s) : f32[N, 70]
  %x = input "x" : f32[2, 45, N]
  %xt = permute[perm=[0, 2, 1]](%x) : f32[2, N, 45]
  %e = exp(%xt) : f32[2, N, 45]
  output "u" = %u
  output "e" = %e"#,
    ),
    (
        "gather",
        r#"
  %t = input "table" : f32[4, N]
  %i = input "ids" : i64[N]
  %y = gather[axis=0](%t, %i) : f32[N, N]
  output "y" = %y"#,
    ),
    (
        "scatter-add",
        r#"
  %i = input "ids" : i64[N, 2]
  %x = input "x" : f32[N, 2, 5]
  %a = scatter_add(%i, %x) : f32[4, 5]
  %j = input "j" : i64[N]
  %xt = input "xt" : f32[3, N]
  %v = permute[perm=[1, 0]](%xt) : f32[N, 3]
  %b = scatter_add(%j, %v) : f32[4, 3]
  %y = concat[axis=1](%a, %b) : f32[4, 8]
  output "y" = %y"#,
    ),
    (
        // Sibling elementwise kernels merged into one (`schedule::merge_elementwise`): an
        // AdamW-like update whose new moments are outputs the new value reads at the same
        // element; and outputs read by a sibling transposed, or shifted through a concat (a
        // token shift), which must not merge. (The second moment is an `abs`, as a second
        // moment is never negative: a random negative one made half the new values NaN, which
        // compared as equal and so checked nothing.)
        "elementwise-siblings",
        r#"
  %p = input "p" : f32[N, 37]
  %g = input "g" : f32[N, 37]
  %m = input "m" : f32[N, 37]
  %vi = input "v" : f32[N, 37]
  %v = abs(%vi) : f32[N, 37]
  %b1 = const[value=0.9] : f32[N, 37]
  %c1 = const[value=0.1] : f32[N, 37]
  %b2 = const[value=0.999] : f32[N, 37]
  %c2 = const[value=0.001] : f32[N, 37]
  %eps = const[value=0.00000001] : f32[N, 37]
  %lr = const[value=0.01] : f32[N, 37]
  %m1 = mul(%b1, %m) : f32[N, 37]
  %m2 = mul(%c1, %g) : f32[N, 37]
  %mn = add(%m1, %m2) : f32[N, 37]
  %gg = mul(%g, %g) : f32[N, 37]
  %v1 = mul(%b2, %v) : f32[N, 37]
  %v2 = mul(%c2, %gg) : f32[N, 37]
  %vn = add(%v1, %v2) : f32[N, 37]
  %sq = sqrt(%vn) : f32[N, 37]
  %den = add(%sq, %eps) : f32[N, 37]
  %u = div(%mn, %den) : f32[N, 37]
  %st = mul(%lr, %u) : f32[N, 37]
  %pn = sub(%p, %st) : f32[N, 37]
  %x = input "x" : f32[9, 9]
  %y = exp(%x) : f32[9, 9]
  %yt = permute[perm=[1, 0]](%y) : f32[9, 9]
  %z = add(%yt, %x) : f32[9, 9]
  %w = mul(%g, %p) : f32[N, 37]
  %ws = slice[axis=1, start=0, end=36](%w) : f32[N, 36]
  %w0 = const[value=0.5] : f32[N, 1]
  %wc = concat[axis=1](%w0, %ws) : f32[N, 37]
  %shift = sub(%wc, %w) : f32[N, 37]
  output "w" = %w
  output "shift" = %shift
  output "m" = %mn
  output "v" = %vn
  output "p" = %pn
  output "y" = %y
  output "z" = %z"#,
    ),
];
