"""Writes tests/fixtures/tensorboard/: events as TensorBoard's own writer encodes them.

`events.json` lists the events (wall time, step, file_version or scalars); `events.tfevents` is
the same events serialised by TensorBoard's protobuf classes and written by its RecordWriter.
tests/tensorboard.rs encodes events.json with ual's writer and compares the bytes.

    pip install tensorboard
    python3 scripts/make_tensorboard_fixture.py
"""

import io
import json
import pathlib

from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/tensorboard"

EVENTS = [
    {"wall_time": 1765000000.25, "step": 0, "file_version": "brain.Event:2"},
    {"wall_time": 1765000001.5, "step": 1,
     "scalars": [["train/loss", 2.5], ["train/nll", 2.25], ["train/lr", 2e-4],
                 ["train/mean_eps", 0.0]]},
    {"wall_time": 1765000002.75, "step": 2,
     "scalars": [["train/loss", 1.0e-7], ["eval/nll", -3.5], ["eval/loss", 123456.789]]},
    # Steps past one varint byte, and past two.
    {"wall_time": 1765000003.0, "step": 300, "scalars": [["train/loss", 1.5]]},
    {"wall_time": 1765000004.0, "step": 70000, "scalars": [["train/tokens_per_s", 812.25]]},
]


def event(spec):
    e = Event(wall_time=spec["wall_time"], step=spec["step"])
    if "file_version" in spec:
        e.file_version = spec["file_version"]
    else:
        e.summary.CopyFrom(Summary(value=[Summary.Value(tag=t, simple_value=v)
                                          for t, v in spec["scalars"]]))
    return e


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    writer = RecordWriter(buffer)
    for spec in EVENTS:
        writer.write(event(spec).SerializeToString())
    (OUT / "events.tfevents").write_bytes(buffer.getvalue())
    (OUT / "events.json").write_text(json.dumps(EVENTS, indent=1) + "\n")


if __name__ == "__main__":
    main()
