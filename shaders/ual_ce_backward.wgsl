// UAL loss, backward. One workgroup per row writes softmax(z) - q straight into the gradient,
// scaled by the upstream gradient, from the lse saved by the forward:
//
//   dL/dz_k = (g_loss + g_lse) * exp(z_k - lse) - g_loss * ((1 - eps) * [k == y] + eps / V)
//
// No one-hot, probability or target tensor exists; masked rows get zeros. With a slice width
// below V the gradient is written slice-major, [V / slice, rows, slice], for a matmul over
// slices of the vocabulary; a slice of V is the plain [rows, V] layout.
{{ enable_f16 }}
@group(0) @binding(0) var<storage, read_write> logits: array<{{ elem }}>;
@group(0) @binding(1) var<storage, read_write> labels: array<f32>;
@group(0) @binding(2) var<storage, read_write> stats: array<f32>;
@group(0) @binding(3) var<storage, read_write> grad_stats: array<f32>;
@group(0) @binding(4) var<storage, read_write> grad_logits: array<{{ elem }}>;
@group(0) @binding(5) var<storage, read_write> info: array<u32>;

const WG: u32 = {{ wg }}u;

@compute @workgroup_size({{ wg }}, 1, 1)
fn main(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let rows = info[0];
    let vocab = info[1];
    let slice = info[2];
    let row = wid.x + wid.y * groups.x;
    if (row >= rows) {
        return;
    }
    let base = row * vocab;
    if (labels[row * 3u + 2u] == 0.0) {
        for (var k = lid; k < vocab; k = k + WG) {
            grad_logits[out_index(row, k, rows, slice)] = {{ elem }}(0.0);
        }
        return;
    }
    let target_id = u32(labels[row * 3u]);
    let eps = labels[row * 3u + 1u];
    let g_loss = grad_stats[row * 2u];
    let g_lse = grad_stats[row * 2u + 1u];
    let lse = stats[row * 2u + 1u];
    let scale = g_loss + g_lse;
    let uniform = g_loss * eps / f32(vocab);
    for (var k = lid; k < vocab; k = k + WG) {
        var g = scale * exp(f32(logits[base + k]) - lse) - uniform;
        if (k == target_id) {
            g = g - g_loss * (1.0 - eps);
        }
        grad_logits[out_index(row, k, rows, slice)] = {{ elem }}(g);
    }
}

// Where column k of a row goes: slice k / slice, then the row within it.
fn out_index(row: u32, k: u32, rows: u32, slice: u32) -> u32 {
    return (k / slice) * rows * slice + row * slice + k % slice;
}
