//! Run checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! `checkpoint/` holds the trainable weights (a PEFT adapter, or a full HF model in f32), the
//! AdamW moments, and `state.json` (step, data position, the held-out loss before training).
//! The learning rate and the random state are functions of the step, so they need no saving.
//! The directory is written under a temporary name and renamed, so a crash at any moment
//! leaves either the previous checkpoint or the new one, never a mixture.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{Context, Result, bail};
use burn::optim::ModuleOptimizer;
use serde::{Deserialize, Serialize};

use super::StepMetrics;
use super::config::{Mode, TrainConfig};
use super::loss_scale::LossScale;
use super::step::Evaluation;
use crate::cluster::Cluster;
use crate::model::{Llama, peft, save};

pub const OPTIMIZER_FILE: &str = "optimizer.bpk";
const STATE_FILE: &str = "state.json";
const MANIFEST_FILE: &str = "manifest.json";

/// Where the run stood when the checkpoint was taken (`state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunCheckpoint {
    /// Optimizer steps completed.
    pub step: usize,
    pub epoch: u64,
    /// Batches consumed in `epoch`.
    pub position: usize,
    /// The held-out loss before the first step.
    pub initial_eval_loss: Option<f64>,
    /// The held-out NLL before the first step.
    #[serde(default)]
    pub initial_eval_nll: Option<f64>,
    /// Ranks of the job that wrote it (unset: one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<usize>,
    /// Each rank's micro-batch (unset: the run's `batch_size` as its config.toml says).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// The dynamic loss scale of an f16 run, so that a resumed run scales as an uninterrupted
    /// one would have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<LossScale>,
    /// The training and held-out files as the run read them, so that a resume notices data
    /// that changed under it (empty in checkpoints from before fingerprints).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<Fingerprint>,
    /// The lowest held-out NLL so far, for `keep_best` and `early_stop_patience`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best: Option<super::early_stop::Best>,
}

/// A data file as a run read it: its path, size and CRC-32.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The path as the configuration gives it.
    pub path: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// The CRC-32 of its contents.
    pub crc32: u32,
}

impl Fingerprint {
    /// The file at `path` now.
    pub fn of(path: &Path) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Self {
            path: path.display().to_string(),
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(&bytes),
        })
    }

    /// Refuses to resume on a file that changed since `saved` was taken, naming it; a file
    /// the resume no longer reads (another held-out set) is no concern.
    pub fn check_unchanged(saved: &[Self], now: &[Self]) -> Result<()> {
        for old in saved {
            if let Some(new) = now.iter().find(|n| n.path == old.path)
                && new != old
            {
                bail!(
                    "{} changed since the checkpoint ({} bytes, CRC-32 {:08x}; now {} bytes, {:08x}): resuming would train on other data; restore it, or pass --allow-data-change to continue on it",
                    old.path,
                    old.bytes,
                    old.crc32,
                    new.bytes,
                    new.crc32
                );
            }
        }
        Ok(())
    }
}

impl RunCheckpoint {
    /// The state of the checkpoint in `checkpoint_dir`.
    pub fn read(checkpoint_dir: &Path) -> Result<Self> {
        read_state(checkpoint_dir)
    }

    /// The held-out evaluation before the first step, as the checkpoint recorded it.
    pub fn initial_eval(&self) -> Option<Evaluation> {
        Some(Evaluation {
            loss: self.initial_eval_loss?,
            nll: self.initial_eval_nll.unwrap_or(f64::NAN),
        })
    }
}

/// The newest complete checkpoint of the run in `run_dir`, on every rank of the job. Rank 0
/// finds it ([`locate`]) and sends its manifest; a rank that sees the same checkpoint (one
/// machine, or a shared filesystem) reads it in place, and the others receive its files into
/// a private temporary directory, removed when the returned value drops.
pub fn share(run_dir: &Path, cluster: &Cluster) -> Result<Shared> {
    let found = cluster.is_root().then(|| locate(run_dir)).transpose();
    let found = cluster.agree(found, "finding the checkpoint to resume")?;
    let dir = found.unwrap_or_else(|| run_dir.join("checkpoint"));
    if !cluster.is_parallel() {
        return Ok(Shared {
            dir,
            temporary: false,
        });
    }
    let mut manifest = match cluster.is_root() {
        true => std::fs::read(dir.join(MANIFEST_FILE)).unwrap_or_default(),
        false => Vec::new(),
    };
    cluster.broadcast(&mut manifest, "sending the checkpoint's manifest");
    let mine = std::fs::read(dir.join(MANIFEST_FILE)).unwrap_or_default();
    let lacking = !manifest.is_empty() && (mine != manifest || !is_complete(&dir));
    let mut wanted = [f64::from(u8::from(lacking))];
    cluster.sum_f64(&mut wanted, "asking for the checkpoint's files");
    if wanted[0] == 0.0 {
        return Ok(Shared {
            dir,
            temporary: false,
        });
    }
    let mut packed = match cluster.is_root() {
        true => pack(&dir)?,
        false => Vec::new(),
    };
    cluster.broadcast(&mut packed, "sending the checkpoint's files");
    if !lacking {
        return Ok(Shared {
            dir,
            temporary: false,
        });
    }
    let private = std::env::temp_dir().join(format!(
        "ual-rank{}-{}-checkpoint",
        cluster.rank(),
        std::process::id()
    ));
    unpack(&packed, &private)?;
    Ok(Shared {
        dir: private,
        temporary: true,
    })
}

/// A checkpoint directory on this rank; a received copy is removed on drop.
pub struct Shared {
    /// Where its files are.
    pub dir: PathBuf,
    temporary: bool,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Every file of `dir` as (relative name, bytes) frames: u64 name length, name, u64 length,
/// bytes.
fn pack(dir: &Path) -> Result<Vec<u8>> {
    let mut packed = Vec::new();
    let mut files = files_under(dir)?;
    files.push(dir.join(MANIFEST_FILE));
    for path in files {
        let name = path.strip_prefix(dir).expect("under dir").to_string_lossy();
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        for part in [name.as_bytes(), &bytes[..]] {
            packed.extend_from_slice(&(part.len() as u64).to_le_bytes());
            packed.extend_from_slice(part);
        }
    }
    Ok(packed)
}

/// Writes [`pack`]'s frames under `dir`.
fn unpack(mut packed: &[u8], dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    let take = |packed: &mut &[u8]| -> Result<Vec<u8>> {
        let short = || anyhow::anyhow!("the checkpoint received from rank 0 is cut short");
        let (len, rest) = packed.split_at_checked(8).ok_or_else(short)?;
        let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
        let (part, rest) = rest.split_at_checked(len).ok_or_else(short)?;
        *packed = rest;
        Ok(part.to_vec())
    };
    while !packed.is_empty() {
        let name = String::from_utf8(take(&mut packed)?)?;
        let bytes = take(&mut packed)?;
        let path = dir.join(&name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Writes `checkpoint/` under a temporary name, with a manifest of every file's size and
/// CRC-32, fsyncs it, then swaps it in. A crash at any moment leaves at least one complete
/// checkpoint among `checkpoint/`, `checkpoint.tmp/` and `checkpoint.old/` ([`locate`]).
pub fn save(
    model: &mut Llama,
    optimizer: &ModuleOptimizer,
    config: &TrainConfig,
    state: &RunCheckpoint,
) -> Result<()> {
    let dir = config.run_dir();
    let tmp = dir.join("checkpoint.tmp");
    // A stale one is from a save that never finished: never the newest complete checkpoint,
    // which `open` has promoted to `checkpoint/` before training resumed.
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    write_contents(model, optimizer, config, state, &tmp)?;
    write_manifest(&tmp)?;
    let final_dir = dir.join("checkpoint");
    let old = dir.join("checkpoint.old");
    let _ = std::fs::remove_dir_all(&old);
    if final_dir.exists() {
        std::fs::rename(&final_dir, &old)?;
    }
    crash_point("checkpoint-swap");
    std::fs::rename(&tmp, &final_dir)?;
    sync_dir(&dir);
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The adapter (or model), the optimizer's moments and `state.json`, into `dir`.
fn write_contents(
    model: &mut Llama,
    optimizer: &ModuleOptimizer,
    config: &TrainConfig,
    state: &RunCheckpoint,
    dir: &Path,
) -> Result<()> {
    match config.mode {
        Mode::Lora => {
            let base = config.model.display().to_string();
            peft::save_peft(model, &config.lora, &base, dir)?
        }
        Mode::Full => save::save_pretrained(
            model,
            &config.model,
            &dir.join("model"),
            safetensors::Dtype::F32,
        )?,
    }
    let optimizer_file = dir.join(OPTIMIZER_FILE);
    optimizer
        .save(&optimizer_file)
        .map_err(|e| anyhow::anyhow!("cannot write {}: {e:?}", optimizer_file.display()))?;
    std::fs::write(dir.join(STATE_FILE), serde_json::to_string_pretty(state)?)?;
    Ok(())
}

/// The newest complete checkpoint of the run in `run_dir`, moved to `checkpoint/` if a crash
/// left it under its temporary or its old name. Complete means its manifest's files are all
/// there with their sizes and checksums (a checkpoint from before manifests: its state reads).
pub fn locate(run_dir: &Path) -> Result<PathBuf> {
    let final_dir = run_dir.join("checkpoint");
    let newest = ["checkpoint", "checkpoint.tmp", "checkpoint.old"]
        .iter()
        .map(|name| run_dir.join(name))
        .filter(|dir| is_complete(dir))
        .filter_map(|dir| Some((read_state(&dir).ok()?.step, dir)))
        .max_by_key(|(step, _)| *step);
    let Some((_, found)) = newest else {
        bail!(
            "cannot resume {}: no complete checkpoint (none was written yet, or it was cut short)",
            run_dir.display()
        );
    };
    if found != final_dir {
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&found, &final_dir).with_context(|| {
            format!("cannot move {} to {}", found.display(), final_dir.display())
        })?;
        sync_dir(run_dir);
    }
    Ok(final_dir)
}

/// `manifest.json`: every file under `dir` (but itself) with its size and CRC-32, written last
/// and fsynced with the files, so that its presence vouches for them.
fn write_manifest(dir: &Path) -> Result<()> {
    let mut files = BTreeMap::new();
    for path in files_under(dir)? {
        sync_file(&path)?;
        let name = path
            .strip_prefix(dir)
            .expect("under dir")
            .to_string_lossy()
            .into_owned();
        files.insert(name, record_of(&path)?);
    }
    let manifest = dir.join(MANIFEST_FILE);
    std::fs::write(&manifest, serde_json::to_string_pretty(&files)?)?;
    sync_file(&manifest)?;
    sync_dir(dir);
    Ok(())
}

fn is_complete(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST_FILE)) else {
        // Checkpoints written before manifests existed were only ever renamed into place whole.
        return dir.ends_with("checkpoint") && dir.join(STATE_FILE).is_file();
    };
    let Ok(files) = serde_json::from_str::<BTreeMap<String, FileRecord>>(&text) else {
        return false;
    };
    files
        .iter()
        .all(|(name, record)| record_of(&dir.join(name)).is_ok_and(|r| &r == record))
}

/// One file's size and CRC-32.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FileRecord {
    bytes: u64,
    crc32: u32,
}

fn record_of(path: &Path) -> Result<FileRecord> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(FileRecord {
        bytes: bytes.len() as u64,
        crc32: crc32fast::hash(&bytes),
    })
}

fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            files.extend(files_under(&path)?);
        } else if !path.ends_with(MANIFEST_FILE) {
            files.push(path);
        }
    }
    Ok(files)
}

fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("cannot sync {}", path.display()))
}

/// Makes a directory's entries (new files, renames) durable. Best effort: not every platform
/// opens a directory as a file.
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Test hook: `UAL_TEST_ABORT_AT=NAME[:N]` aborts the process (as `kill -9` would, with no
/// clean-up) the N-th time (default 1st) it reaches the point `name`.
fn crash_point(name: &str) {
    static REACHED: AtomicUsize = AtomicUsize::new(0);
    let Ok(target) = std::env::var("UAL_TEST_ABORT_AT") else {
        return;
    };
    let (point, nth) = target.split_once(':').unwrap_or((&target, "1"));
    if point == name && REACHED.fetch_add(1, Ordering::SeqCst) + 1 == nth.parse().unwrap_or(1) {
        std::process::abort();
    }
}

fn read_state(checkpoint_dir: &Path) -> Result<RunCheckpoint> {
    let path = checkpoint_dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "cannot resume: {} not found (no checkpoint was written yet)",
            path.display()
        )
    })?;
    serde_json::from_str(&text)
        .with_context(|| format!("{}: invalid checkpoint state", path.display()))
}

/// The metrics of steps `1..=step` from an earlier `metrics.jsonl`, and those lines as they
/// were written: a resume keeps them byte for byte rather than writing them again.
pub fn metrics_until(path: &Path, step: usize) -> Result<(Vec<StepMetrics>, String)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (mut kept, mut lines) = (Vec::new(), String::new());
    for line in text.lines() {
        // A crash can cut the last line short; such a line lies past the checkpoint anyway.
        match serde_json::from_str::<StepMetrics>(line) {
            Ok(m) if m.step <= step => {
                kept.push(m);
                lines.push_str(line);
                lines.push('\n');
            }
            _ => {}
        }
    }
    Ok((kept, lines))
}

/// The dtype a full fine-tune is exported in: `export_dtype`, or the base checkpoint's.
pub fn export_dtype(config: &TrainConfig) -> Result<safetensors::Dtype> {
    match &config.export_dtype {
        Some(name) => save::dtype_from_torch(Some(name)),
        None => Ok(match crate::model::saved_dtype(&config.model)? {
            d @ (safetensors::Dtype::F16 | safetensors::Dtype::BF16) => d,
            _ => safetensors::Dtype::F32,
        }),
    }
}

#[cfg(test)]
mod round_trip {
    /// Floats read back from metrics and results are the floats written: serde_json's default
    /// parser is off by an ulp for some values (3.6755378246307373 came back …377).
    #[test]
    fn floats_survive_writing_and_reading() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = (x >> 11) as f64 / (1u64 << 53) as f64 * 10.0;
            let text = serde_json::to_string(&v).unwrap();
            let back: f64 = serde_json::from_str(&text).unwrap();
            assert_eq!(back.to_bits(), v.to_bits(), "{text}");
        }
        let v: f64 = serde_json::from_str("3.6755378246307373").unwrap();
        assert_eq!(serde_json::to_string(&v).unwrap(), "3.6755378246307373");
    }
}
