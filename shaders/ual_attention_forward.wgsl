// Causal attention, forward, as FlashAttention-2 runs it: one invocation per query row, one
// workgroup per block of ROWS rows of one head, keys and values streamed through workgroup
// memory KEYS at a time with an online softmax, so no [len, len] score exists anywhere.
//
//   o_i   = Σ_j p_ij v_j,   p_ij = exp(s_ij − lse_i),   s_ij = q_i·k_j / √D
//   lse_i = log Σ_j exp(s_ij)        over the keys j that query i sees
//
// Query i sees key j when j ≤ i and i − j < window (window = 0xffffffff: none). Query head h
// reads key/value head h / (heads / kv_heads) (grouped-query attention), never a repeated copy.
//
// q, o:  [batch, heads, len, D]      k, v: [batch, kv_heads, len, D]   (contiguous, `elem`)
// lse:   [batch, heads, len] f32     info: (len, heads, kv_heads, window)
{{ enable_f16 }}
@group(0) @binding(0) var<storage, read_write> q: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> k: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> v: array<{{ elem }}>;
@group(0) @binding(3) var<storage, read_write> o: array<{{ elem }}>;
@group(0) @binding(4) var<storage, read_write> lse: array<f32>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

const D: u32 = {{ dim }}u;
const ROWS: u32 = {{ rows }}u;
const KEYS: u32 = {{ keys }}u;
// A finite stand-in for −∞, so that rescaling an empty row gives 0 and never NaN.
const NEG_BIG: f32 = -3.0e38;

var<workgroup> k_tile: array<f32, {{ tile }}>;
var<workgroup> v_tile: array<f32, {{ tile }}>;
// The loop bounds must be uniform across the workgroup for its barriers.
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

    // The scale folded into q once, rather than into every score.
    let scale = inverseSqrt(f32(D));
    var qi: array<f32, D>;
    var acc: array<f32, D>;
    for (var d = 0u; d < D; d = d + 1u) {
        acc[d] = 0.0;
        if (live) {
            qi[d] = f32(q[row + d]) * scale;
        } else {
            qi[d] = 0.0;
        }
    }
    var m = NEG_BIG;
    var l = 0.0;

    // From the earliest key the block's first row sees to its last row.
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
            var s: array<f32, KEYS>;
            var tile_max = NEG_BIG;
            for (var c = 0u; c < KEYS; c = c + 1u) {
                let j = t + c;
                var score = NEG_BIG;
                if (j <= i && i - j < window) {
                    var dot = 0.0;
                    for (var d = 0u; d < D; d = d + 1u) {
                        dot = dot + qi[d] * k_tile[c * D + d];
                    }
                    score = dot;
                }
                s[c] = score;
                tile_max = max(tile_max, score);
            }
            if (tile_max > NEG_BIG) {
                let m_new = max(m, tile_max);
                let correction = exp(m - m_new);
                l = l * correction;
                for (var d = 0u; d < D; d = d + 1u) {
                    acc[d] = acc[d] * correction;
                }
                for (var c = 0u; c < KEYS; c = c + 1u) {
                    if (s[c] > NEG_BIG) {
                        let p = exp(s[c] - m_new);
                        l = l + p;
                        for (var d = 0u; d < D; d = d + 1u) {
                            acc[d] = acc[d] + p * v_tile[c * D + d];
                        }
                    }
                }
                m = m_new;
            }
        }
        workgroupBarrier();
    }
    if (live) {
        // Every row sees at least its own key, so l ≥ 1.
        let inv = 1.0 / l;
        for (var d = 0u; d < D; d = d + 1u) {
            o[row + d] = {{ elem }}(acc[d] * inv);
        }
        lse[head * len + i] = m + log(l);
    }
}
