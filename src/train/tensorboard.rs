//! TensorBoard's event file, written by hand: a TFRecord stream of `Event` protocol buffers,
//! each step one `Event` whose `Summary` holds the step's scalars as `simple_value`s.
//!
//! No crate: the one that exists (`tensorboard-rs`) is unmaintained and pulls protobuf 2 and an
//! image codec. The format is four message fields and a checksum, and the tests hold ual's
//! bytes to those of TensorBoard's own writer (`scripts/make_tensorboard_fixture.py`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// The file's name: TensorBoard reads every file under its `--logdir` whose name holds
/// `tfevents`, and one fixed name lets a resume find and cut the file.
pub const FILE_NAME: &str = "events.out.tfevents.ual";

/// What an event file begins with (TensorFlow's `Event.file_version`).
const FILE_VERSION: &str = "brain.Event:2";

/// One `Event`: the wall time, the step, and either the file's version or named scalars.
#[derive(Debug, Clone, PartialEq)]
struct Event<'a> {
    wall_time: f64,
    step: i64,
    body: Body<'a>,
}

/// What an [`Event`] carries.
#[derive(Debug, Clone, PartialEq)]
enum Body<'a> {
    FileVersion(&'a str),
    Scalars(Vec<(&'a str, f32)>),
}

impl Event<'_> {
    /// The `Event` message. proto3 leaves out fields that hold their default, as protobuf's own
    /// encoders do (`simple_value` sits in a oneof, so it is always written).
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if self.wall_time != 0.0 {
            out.push(field(1, FIXED64));
            out.extend(self.wall_time.to_le_bytes());
        }
        if self.step != 0 {
            out.push(field(2, VARINT));
            varint(&mut out, self.step as u64);
        }
        match &self.body {
            Body::FileVersion(version) => bytes(&mut out, 3, version.as_bytes()),
            Body::Scalars(values) => {
                let mut summary = Vec::new();
                for (tag, value) in values {
                    let mut v = Vec::new();
                    bytes(&mut v, 1, tag.as_bytes());
                    v.push(field(2, FIXED32));
                    v.extend(value.to_le_bytes());
                    bytes(&mut summary, 1, &v);
                }
                bytes(&mut out, 5, &summary);
            }
        }
        out
    }
}

const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LENGTH: u8 = 2;
const FIXED32: u8 = 5;

fn field(number: u8, wire: u8) -> u8 {
    number << 3 | wire
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn bytes(out: &mut Vec<u8>, number: u8, data: &[u8]) {
    out.push(field(number, LENGTH));
    varint(out, data.len() as u64);
    out.extend(data);
}

/// One TFRecord: the length, its checksum, the data, the data's checksum.
fn record(data: &[u8]) -> Vec<u8> {
    let length = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend(length);
    out.extend(masked_crc(&length).to_le_bytes());
    out.extend(data);
    out.extend(masked_crc(data).to_le_bytes());
    out
}

/// TFRecord's CRC-32C, rotated and offset so that a CRC of data holding CRCs stays strong.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The step of each record in `file`, with the record's end offset, as far as the records
/// are whole (a crash may cut the last).
fn record_steps(file: &[u8]) -> Vec<(i64, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(header) = file.get(at..at + 12) {
        let length = u64::from_le_bytes(header[..8].try_into().expect("8 bytes")) as usize;
        let end = at + 12 + length + 4;
        let Some(data) = file.get(at + 12..at + 12 + length) else {
            break;
        };
        if end > file.len() {
            break;
        }
        out.push((event_step(data), end));
        at = end;
    }
    out
}

/// An encoded `Event`'s step (0 when it has none).
fn event_step(mut data: &[u8]) -> i64 {
    fn read_varint(data: &mut &[u8]) -> u64 {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some((&b, rest)) = data.split_first() else {
                break;
            };
            *data = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                break;
            }
        }
        v
    }
    while let Some((&key, rest)) = data.split_first() {
        data = rest;
        match (key >> 3, key & 7) {
            (2, VARINT) => return read_varint(&mut data) as i64,
            (_, VARINT) => _ = read_varint(&mut data),
            (_, FIXED64) => data = data.get(8..).unwrap_or_default(),
            (_, FIXED32) => data = data.get(4..).unwrap_or_default(),
            (_, LENGTH) => {
                let n = read_varint(&mut data) as usize;
                data = data.get(n..).unwrap_or_default();
            }
            _ => break,
        }
    }
    0
}

/// A run's event file, open for appending.
pub struct EventFile {
    file: File,
}

impl EventFile {
    /// Opens `dir`'s event file keeping the records of steps up to `kept` byte for byte (a
    /// resume drops those a crash left past its checkpoint), or starts one.
    pub fn open(dir: &Path, kept: usize) -> Result<Self> {
        let path = dir.join(FILE_NAME);
        let old = std::fs::read(&path).unwrap_or_default();
        let end = record_steps(&old)
            .into_iter()
            .take_while(|&(step, _)| step <= kept as i64)
            .last()
            .map_or(0, |(_, end)| end);
        let mut start = old[..end].to_vec();
        if start.is_empty() {
            let version = Event {
                wall_time: now(),
                step: 0,
                body: Body::FileVersion(FILE_VERSION),
            };
            start = record(&version.encode());
        }
        crate::util::write_atomic(&path, &start)?;
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(Self { file })
    }

    /// Appends one step's scalars.
    pub fn write(&mut self, step: usize, scalars: Vec<(&str, f32)>) -> Result<()> {
        let event = Event {
            wall_time: now(),
            step: step as i64,
            body: Body::Scalars(scalars),
        };
        self.file.write_all(&record(&event.encode()))?;
        Ok(self.file.flush()?)
    }
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The events of `scripts/make_tensorboard_fixture.py`, encoded by ual, are the bytes
    /// TensorBoard's protobuf classes and RecordWriter wrote for them.
    #[test]
    fn event_records_are_tensorboards_bytes() {
        let specs: Vec<serde_json::Value> =
            serde_json::from_str(include_str!("../../tests/fixtures/tensorboard/events.json"))
                .unwrap();
        let want = include_bytes!("../../tests/fixtures/tensorboard/events.tfevents");
        let mut got = Vec::new();
        for spec in &specs {
            let body = match spec.get("file_version") {
                Some(v) => Body::FileVersion(v.as_str().unwrap()),
                None => Body::Scalars(
                    spec["scalars"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|p| (p[0].as_str().unwrap(), p[1].as_f64().unwrap() as f32))
                        .collect(),
                ),
            };
            let event = Event {
                wall_time: spec["wall_time"].as_f64().unwrap(),
                step: spec["step"].as_i64().unwrap(),
                body,
            };
            got.extend(record(&event.encode()));
        }
        assert_eq!(got.len(), want.len(), "bytes written");
        assert!(got == want, "the records differ from TensorBoard's");
        let steps: Vec<i64> = record_steps(want).iter().map(|r| r.0).collect();
        assert_eq!(steps, [0, 1, 2, 300, 70000], "steps read back");
    }

    #[test]
    fn a_resume_keeps_the_records_up_to_its_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = EventFile::open(dir.path(), 0).unwrap();
        for step in 1..=5 {
            file.write(step, vec![("train/loss", step as f32)]).unwrap();
        }
        let whole = std::fs::read(dir.path().join(FILE_NAME)).unwrap();
        let steps: Vec<i64> = record_steps(&whole).iter().map(|r| r.0).collect();
        assert_eq!(steps, [0, 1, 2, 3, 4, 5]);
        // A crash cut the last record in half.
        std::fs::write(dir.path().join(FILE_NAME), &whole[..whole.len() - 5]).unwrap();
        drop(EventFile::open(dir.path(), 3).unwrap());
        let cut = std::fs::read(dir.path().join(FILE_NAME)).unwrap();
        let ends = record_steps(&whole);
        assert_eq!(cut, whole[..ends[3].1], "records 0..=3 byte for byte");
    }
}
