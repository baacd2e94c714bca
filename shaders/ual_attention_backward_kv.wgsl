// Causal attention, backward, part 2: the gradients with respect to k and v, one invocation per
// key row of one key/value head, the queries of every query head that shares it streamed through
// workgroup memory. Each key's sums are its own, so no two invocations write one value and
// grouped-query heads need no atomics:
//
//   dv_j = Σ_h Σ_i p_ij dO_i
//   dk_j = Σ_h Σ_i ds_ij q_i / √D,   ds_ij = p_ij (dO_i·v_j − δ_i)
//
// with p recomputed from lse and δ from part 1.
//
// q, grad: [batch, heads, len, D]    k, v, dk, dv: [batch, kv_heads, len, D]
// lse, delta: [batch, heads, len] f32    info: (len, heads, kv_heads, window)
{{ enable_f16 }}
@group(0) @binding(0) var<storage, read_write> q: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> k: array<{{ elem }}>;
@group(0) @binding(2) var<storage, read_write> v: array<{{ elem }}>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad: array<{{ elem }}>;
@group(0) @binding(5) var<storage, read_write> delta: array<f32>;
@group(0) @binding(6) var<storage, read_write> dk: array<{{ elem }}>;
@group(0) @binding(7) var<storage, read_write> dv: array<{{ elem }}>;
@group(0) @binding(8) var<storage, read_write> info: array<u32>;

const D: u32 = {{ dim }}u;
const ROWS: u32 = {{ rows }}u;
const KEYS: u32 = {{ keys }}u;

var<workgroup> q_tile: array<f32, {{ tile }}>;
var<workgroup> g_tile: array<f32, {{ tile }}>;
var<workgroup> lse_tile: array<f32, KEYS>;
var<workgroup> delta_tile: array<f32, KEYS>;
var<workgroup> shared_info: vec4<u32>;

@compute @workgroup_size({{ rows }}, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (lid == 0u) {
        shared_info = vec4<u32>(info[0], info[1], info[2], info[3]);
    }
    let sizes = workgroupUniformLoad(&shared_info);
    let len = sizes.x;
    let heads = sizes.y;
    let kv_heads = sizes.z;
    let window = sizes.w;
    let group = heads / kv_heads;

    let kv_head = wid.y;
    let batch = kv_head / kv_heads;
    let first = wid.x * ROWS;
    let last = min(first + ROWS, len);
    let j = first + lid;
    let live = j < len;
    let row = (kv_head * len + j) * D;
    let scale = inverseSqrt(f32(D));

    var kj: array<f32, D>;
    var vj: array<f32, D>;
    var dkj: array<f32, D>;
    var dvj: array<f32, D>;
    for (var d = 0u; d < D; d = d + 1u) {
        kj[d] = 0.0;
        vj[d] = 0.0;
        dkj[d] = 0.0;
        dvj[d] = 0.0;
        if (live) {
            kj[d] = f32(k[row + d]) * scale;
            vj[d] = f32(v[row + d]);
        }
    }

    // The queries that see some key of the block: from its first key to its last key's window.
    var end = len;
    if (window < len && last - 1u + window < len) {
        end = last - 1u + window;
    }
    for (var r = 0u; r < group; r = r + 1u) {
        let head = batch * heads + (kv_head % kv_heads) * group + r;
        let q_base = head * len;
        for (var t = first; t < end; t = t + KEYS) {
            for (var e = lid; e < KEYS * D; e = e + ROWS) {
                let i = t + e / D;
                var qg = vec2<f32>(0.0, 0.0);
                if (i < len) {
                    let at = (q_base + i) * D + e % D;
                    qg = vec2<f32>(f32(q[at]), f32(grad[at]));
                }
                q_tile[e] = qg.x;
                g_tile[e] = qg.y;
            }
            for (var c = lid; c < KEYS; c = c + ROWS) {
                let i = t + c;
                var ld = vec2<f32>(0.0, 0.0);
                if (i < len) {
                    ld = vec2<f32>(lse[q_base + i], delta[q_base + i]);
                }
                lse_tile[c] = ld.x;
                delta_tile[c] = ld.y;
            }
            workgroupBarrier();
            if (live) {
                for (var c = 0u; c < KEYS; c = c + 1u) {
                    let i = t + c;
                    if (i < len && j <= i && i - j < window) {
                        var score = 0.0;
                        var dp = 0.0;
                        for (var d = 0u; d < D; d = d + 1u) {
                            score = score + q_tile[c * D + d] * kj[d];
                            dp = dp + g_tile[c * D + d] * vj[d];
                        }
                        let p = exp(score - lse_tile[c]);
                        let ds = p * (dp - delta_tile[c]);
                        for (var d = 0u; d < D; d = d + 1u) {
                            dvj[d] = dvj[d] + p * g_tile[c * D + d];
                            dkj[d] = dkj[d] + ds * q_tile[c * D + d];
                        }
                    }
                }
            }
            workgroupBarrier();
        }
    }
    if (live) {
        for (var d = 0u; d < D; d = d + 1u) {
            dk[row + d] = {{ elem }}(dkj[d] * scale);
            dv[row + d] = {{ elem }}(dvj[d]);
        }
    }
}
