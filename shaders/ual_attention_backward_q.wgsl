// Causal attention, backward, part 1: the gradient with respect to q, one invocation per query
// row, keys and values streamed through workgroup memory as in the forward pass. The
// probabilities are recomputed from the saved log-sum-exp, never stored:
//
//   p_ij  = exp(q_i·k_j / √D − lse_i)
//   δ_i   = Σ_d dO_id · o_id                      (= Σ_j p_ij dp_ij)
//   ds_ij = p_ij (dO_i·v_j − δ_i)
//   dq_i  = Σ_j ds_ij k_j / √D
//
// δ is written out for part 2 (the keys' and values' gradients).
//
// q, o, grad, dq: [batch, heads, len, D]     k, v: [batch, kv_heads, len, D]
// lse, delta:     [batch, heads, len] f32    info: (len, heads, kv_heads, window)
{{ enable_f16 }}
@group(0) @binding(0) var<storage, read_write> q: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> k: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> v: array<{{ elem }}>;
@group(0) @binding(3) var<storage, read_write> o: array<{{ elem }}>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
@group(0) @binding(5) var<storage, read_write> grad: array<{{ elem }}>;
@group(0) @binding(6) var<storage, read_write> delta: array<f32>;
@group(0) @binding(7) var<storage, read_write> dq: array<{{ elem }}>;
@group(0) @binding(8) var<storage, read_write> info: array<u32>;

const D: u32 = {{ dim }}u;
const ROWS: u32 = {{ rows }}u;
const KEYS: u32 = {{ keys }}u;

var<workgroup> k_tile: array<f32, {{ tile }}>;
var<workgroup> v_tile: array<f32, {{ tile }}>;
var<workgroup> shared_len: u32;
var<workgroup> shared_window: u32;

@compute @workgroup_size({{ rows }}, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (lid == 0u) {
        shared_len = info[0];
        shared_window = info[3];
    }
    let len = workgroupUniformLoad(&shared_len);
    let window = workgroupUniformLoad(&shared_window);
    let heads = info[1];
    let kv_heads = info[2];

    let head = wid.y;
    let kv_head = (head / heads) * kv_heads + (head % heads) / (heads / kv_heads);
    let first = wid.x * ROWS;
    let last = min(first + ROWS, len);
    let i = first + lid;
    let live = i < len;
    let row = (head * len + i) * D;
    let kv_base = kv_head * len * D;
    let scale = inverseSqrt(f32(D));

    var qi: array<f32, D>;
    var gi: array<f32, D>;
    var acc: array<f32, D>;
    var di = 0.0;
    var li = 0.0;
    for (var d = 0u; d < D; d = d + 1u) {
        acc[d] = 0.0;
        qi[d] = 0.0;
        gi[d] = 0.0;
        if (live) {
            qi[d] = f32(q[row + d]) * scale;
            gi[d] = f32(grad[row + d]);
            di = di + gi[d] * f32(o[row + d]);
        }
    }
    if (live) {
        li = lse[head * len + i];
        delta[head * len + i] = di;
    }

    var start = 0u;
    if (first + 1u > window) {
        start = first + 1u - window;
    }
    for (var t = start; t < last; t = t + KEYS) {
        for (var e = lid; e < KEYS * D; e = e + ROWS) {
            let j = t + e / D;
            var kv = vec2<f32>(0.0, 0.0);
            if (j < len) {
                let at = kv_base + j * D + e % D;
                kv = vec2<f32>(f32(k[at]), f32(v[at]));
            }
            k_tile[e] = kv.x;
            v_tile[e] = kv.y;
        }
        workgroupBarrier();
        if (live) {
            for (var c = 0u; c < KEYS; c = c + 1u) {
                let j = t + c;
                if (j <= i && i - j < window) {
                    var score = 0.0;
                    var dp = 0.0;
                    for (var d = 0u; d < D; d = d + 1u) {
                        score = score + qi[d] * k_tile[c * D + d];
                        dp = dp + gi[d] * v_tile[c * D + d];
                    }
                    let ds = exp(score - li) * (dp - di);
                    for (var d = 0u; d < D; d = d + 1u) {
                        acc[d] = acc[d] + ds * k_tile[c * D + d];
                    }
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        for (var d = 0u; d < D; d = d + 1u) {
            dq[row + d] = {{ elem }}(acc[d] * scale);
        }
    }
}
