// UAL loss, forward. One workgroup per row; one pass over the vocabulary with an online
// max / log-sum-exp, so the row is read once and only O(rows) values are written.
//
//   loss = (1 - eps) * (lse - z_y) + eps * (lse - mean_k z_k)
//
// labels: [rows, 3] = (target, smoothing, mask) as f32 (ids < 2^24 are exact).
// stats:  [rows, 2] = (loss, lse); masked rows get (0, 0) and never read their logits.
{{ enable_f16 }}
@group(0) @binding(0) var<storage, read_write> logits: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> labels: array<f32>;
@group(0) @binding(2) var<storage, read_write> stats: array<f32>;
@group(0) @binding(3) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ wg }}u;
// A finite stand-in for -inf: merging two empty partials must not produce NaN.
const NEG_BIG: f32 = -3.0e38;

var<workgroup> part_max: array<f32, WG>;
var<workgroup> part_sum: array<f32, WG>;
var<workgroup> part_z: array<f32, WG>;

@compute @workgroup_size({{ wg }}, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let rows = info[0];
    let vocab = info[1];
    let row = wid.x + wid.y * groups.x;
    let valid = row < rows;
    // Barriers below must be reached by every invocation, so inactive rows loop zero times
    // instead of returning early.
    var counted = false;
    if (valid) {
        counted = labels[row * 3u + 2u] != 0.0;
    }
    var n = 0u;
    if (counted) {
        n = vocab;
    }
    let base = row * vocab;

    var m = NEG_BIG;
    var s = 0.0;
    var zsum = 0.0;
    for (var k = lid; k < n; k = k + WG) {
        let z = f32(logits[base + k]);
        zsum = zsum + z;
        if (z > m) {
            s = s * exp(m - z) + 1.0;
            m = z;
        } else {
            s = s + exp(z - m);
        }
    }
    part_max[lid] = m;
    part_sum[lid] = s;
    part_z[lid] = zsum;
    workgroupBarrier();

    for (var stride = WG / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            let m1 = part_max[lid];
            let m2 = part_max[lid + stride];
            let mm = max(m1, m2);
            part_sum[lid] = part_sum[lid] * exp(m1 - mm) + part_sum[lid + stride] * exp(m2 - mm);
            part_max[lid] = mm;
            part_z[lid] = part_z[lid] + part_z[lid + stride];
        }
        workgroupBarrier();
    }

    if (lid == 0u && valid) {
        if (counted) {
            let lse = part_max[0] + log(part_sum[0]);
            let target_id = u32(labels[row * 3u]);
            let eps = labels[row * 3u + 1u];
            let zy = f32(logits[base + target_id]);
            let mean_z = part_z[0] / f32(vocab);
            stats[row * 2u] = (1.0 - eps) * (lse - zy) + eps * (lse - mean_z);
            stats[row * 2u + 1u] = lse;
        } else {
            stats[row * 2u] = 0.0;
            stats[row * 2u + 1u] = 0.0;
        }
    }
}
